"""``nilai attest verify URL``: fetch a fresh attestation report and say what it proves.

Exit status (``EXIT_STATUS_HELP``): 0 when the report is bound to the key and the fresh nonce
and its evidence is fully verified; 1 when a check fails; 2 for usage or connection problems;
3 when the binding holds but the hardware evidence is not verified (its signature chain is
left to the vendor's tools); 4 when the binding holds but the evidence is simulated. This
version verifies no hardware signature, so a hardware report ends with 3, never 0: a script
that accepts only 0 fails closed.
"""

from __future__ import annotations

import argparse
import os
import secrets
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx

from nilai.attestation.base import EvidenceError
from nilai.attestation.report import SERVER_NONCE_BYTES
from nilai.attestation.verify import VerifiedReport, decode_public_key, verify_report
from nilai.cli.common import fail

COMMAND = "attest verify"

EXIT_VERIFIED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_HARDWARE_UNVERIFIED = 3
EXIT_SIMULATED = 4

EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_VERIFIED}  bound to the key and the fresh nonce, and the evidence fully verified
  {EXIT_FAILED}  a check failed: wrong key, stale nonce, unbound or unreadable evidence
  {EXIT_USAGE}  usage or connection problem (no verdict)
  {EXIT_HARDWARE_UNVERIFIED}  bound, but the hardware evidence is NOT verified: the quote's
     signature chain, TCB and measurements are left to the vendor's tools (this
     version verifies no hardware signature, so every tsm and http report ends here)
  {EXIT_SIMULATED}  bound, but the evidence is SIMULATED: no hardware guarantee
"""
_MEANINGS = {
    EXIT_VERIFIED: "bound and verified",
    EXIT_HARDWARE_UNVERIFIED: "bound, hardware evidence not verified",
    EXIT_SIMULATED: "bound, evidence simulated (no hardware guarantee)",
}


class GatewayError(Exception):
    """The gateway could not be asked, or answered with something unusable."""


def register(commands: Any) -> None:
    """Add the ``attest`` command and its ``verify`` action."""
    # Any: argparse's subparsers action type is private.
    parser: argparse.ArgumentParser = commands.add_parser(
        "attest", help="check a gateway's attestation report"
    )
    actions = parser.add_subparsers(dest="attest_command", required=True, metavar="ACTION")
    verify: argparse.ArgumentParser = actions.add_parser(
        "verify",
        help="fetch a report for a fresh nonce and check it is bound to the key",
        description="Fetch an attestation report for a fresh nonce, check that it is bound\n"
        "to the gateway's key and that nonce, and say what was and was not verified.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("url", help="gateway base URL, e.g. https://nilai.example.com")
    verify.add_argument("--api-key", help="API key (default: the NILAI_API_KEY variable)")
    verify.add_argument(
        "--public-key",
        help="the gateway key you trust (base64); default: read from URL/v1/public_key",
    )
    verify.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per request (default 30)"
    )
    verify.add_argument("--save", help="also write the report JSON to this file")
    verify.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Verify the gateway at ``args.url``; print the outcome and return the exit status."""
    api_key: str | None = args.api_key or os.environ.get("NILAI_API_KEY")
    if not api_key:
        return fail(COMMAND, "no API key: pass --api-key or set NILAI_API_KEY")
    pinned: bytes | None = None
    if args.public_key:
        try:
            pinned = decode_public_key(args.public_key)
        except ValueError as exc:
            return fail(COMMAND, f"--public-key: {exc}")
    base = base_url(args.url)
    nonce = secrets.token_bytes(SERVER_NONCE_BYTES)
    try:
        with httpx.Client(timeout=args.timeout) as client:
            body = fetch_report(client, base, api_key, nonce)
            public_key = pinned or fetch_public_key(client, base)
    except GatewayError as exc:
        return fail(COMMAND, str(exc))
    if args.save:
        try:
            Path(args.save).write_bytes(body)
        except OSError as exc:
            return fail(COMMAND, f"cannot write {args.save}: {exc.strerror or exc}")
    try:
        verified = verify_report(body, public_key=public_key, nonce=nonce)
    except EvidenceError as exc:
        print(f"FAIL: {exc}")
        return EXIT_FAILED
    return print_outcome(verified, pinned=pinned is not None)


def exit_status(verified: VerifiedReport) -> int:
    """The exit status for a bound report: 0 only when nothing was left unverified."""
    if verified.simulated:
        return EXIT_SIMULATED
    if verified.unverified:
        return EXIT_HARDWARE_UNVERIFIED
    return EXIT_VERIFIED


def base_url(url: str) -> str:
    """The gateway's base URL, accepting one that ends in ``/`` or ``/v1``."""
    return url.rstrip("/").removesuffix("/v1")


def fetch_report(client: httpx.Client, base: str, api_key: str, nonce: bytes) -> bytes:
    """``GET /v1/attestation/report?nonce=...`` and return the raw body."""
    response = _get(
        client,
        f"{base}/v1/attestation/report",
        params={"nonce": nonce.hex()},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    return response.content


def fetch_public_key(client: httpx.Client, base: str) -> bytes:
    """``GET /v1/public_key`` and return the decoded key."""
    url = f"{base}/v1/public_key"
    response = _get(client, url)
    try:
        text: Any = response.json()  # Any: checked below
    except ValueError:
        text = None
    if not isinstance(text, str):
        raise GatewayError(f"{url} did not answer a JSON string")
    try:
        return decode_public_key(text)
    except ValueError as exc:
        raise GatewayError(f"{url} answered an unusable key: {exc}") from None


def _get(client: httpx.Client, url: str, **kwargs: Any) -> httpx.Response:
    # Any: httpx's request keyword arguments.
    try:
        response = client.get(url, **kwargs)
    except httpx.HTTPError as exc:
        raise GatewayError(f"cannot reach {url}: {exc}") from None
    if response.status_code != HTTPStatus.OK:
        raise GatewayError(f"{url} answered {response.status_code}: {_error_message(response)}")
    return response


def _error_message(response: httpx.Response) -> str:
    try:
        body: Any = response.json()  # Any: an OpenAI error object, checked below
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.reason_phrase or "error"
    return str(message)


def print_outcome(verified: VerifiedReport, *, pinned: bool) -> int:
    """Say what holds and what was not verified; return the exit status that says the same."""
    report = verified.report
    status = exit_status(verified)
    source = "the pinned key" if pinned else "the key from /v1/public_key"
    bound = f"the report is bound to {source} and to a fresh nonce"
    verdicts = {
        EXIT_VERIFIED: f"OK: {bound}, and its evidence is verified.",
        EXIT_HARDWARE_UNVERIFIED: f"UNVERIFIED: {bound}, but its hardware evidence is NOT "
        "verified.",
        EXIT_SIMULATED: f"SIMULATED: {bound}, but its evidence is simulated.",
    }
    print(verdicts[status])
    print(f"  verifying_key {report.verifying_key}")
    print(f"  nonce         {report.nonce}")
    print(f"  report_data   {report.report_data} = SHA-256(public key || nonce)")
    backend = report.details.get("tsm_provider")
    print(f"  provider      {report.provider}{f' ({backend})' if backend else ''}")
    for check in verified.proven:
        print(f"  checked       {check}")
    for gap in verified.unverified:
        print(f"  NOT verified  {gap}")
    if not pinned:
        print("  (pass --public-key to pin the key instead of trusting /v1/public_key)")
    if status == EXIT_HARDWARE_UNVERIFIED:
        print(
            "Check cpu_attestation"
            + (" and gpu_attestation" if report.gpu_attestation is not None else "")
            + " with the vendor's tools (AMD SEV-SNP or Intel TDX quote verification, NVIDIA's "
            "attestation SDK for GPUs); they must accept it and show this report_data."
        )
    print(f"exit status {status}: {_MEANINGS[status]}")
    return status
