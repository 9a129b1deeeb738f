"""``nilai attest verify URL`` and ``nilai attest verify-quote FILE``: say what evidence proves.

``verify`` fetches a fresh attestation report from a gateway and runs every check of
``nilai.attestation.verify`` on it; ``verify-quote`` verifies a bare TDX quote (no gateway, no
key binding). Both print each check by name, the TDX measurements (MRTD, RTMR0-3) so they can
be recorded and pinned, and what stays unverified.

Exit status (``EXIT_STATUS_HELP``): 0 when every check passed and nothing is left unverified
(for TDX: the quote verified to Intel's root, the TCB status accepted, all five measurements
pinned and matching); 1 when a check fails (its name is printed); 2 for usage or connection
problems; 3 when every check passed but something is not verified (measurements not pinned, an
SEV-SNP or attester JSON report whose signature is not checked, relayed GPU evidence); 4 when
the evidence is simulated (0 with ``--allow-simulated``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import httpx

from nilai.attestation.pccs import INTEL_PCS_URL
from nilai.attestation.report import SERVER_NONCE_BYTES
from nilai.attestation.tdx import MEASUREMENT_NAMES, TCB_STATUSES, TdxVerification
from nilai.attestation.verify import (
    SIMULATED_NOTICE,
    Check,
    QuoteVerification,
    TdxPolicy,
    VerifiedReport,
    check_quote,
    check_report,
    decode_public_key,
)
from nilai.cli.common import fail

COMMAND = "attest verify"
QUOTE_COMMAND = "attest verify-quote"

EXIT_VERIFIED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FULLY_VERIFIED = 3
EXIT_SIMULATED = 4

EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_VERIFIED}  every check passed and nothing is left unverified: bound to the key and
     the fresh nonce, TDX quote verified to Intel's root, TCB status accepted,
     MRTD and RTMR0-3 pinned and matching (or --allow-simulated for simulated)
  {EXIT_FAILED}  a check failed; its name is printed (wrong key, stale nonce, collateral_missing,
     quote_signature, collateral_expired, binding, tcb_status, measurement:mrtd, ...)
  {EXIT_USAGE}  usage or connection problem (no verdict)
  {EXIT_NOT_FULLY_VERIFIED}  every check passed, but something is NOT verified: measurements not
     pinned, an SEV-SNP or attester report whose signature is left to the vendor's
     tools, or relayed GPU evidence
  {EXIT_SIMULATED}  bound, but the evidence is simulated, no hardware evidence
"""
_MEANINGS = {
    EXIT_VERIFIED: "verified",
    EXIT_FAILED: "a check failed",
    EXIT_NOT_FULLY_VERIFIED: "not fully verified",
    EXIT_SIMULATED: f"{SIMULATED_NOTICE} (pass --allow-simulated to accept)",
}


class GatewayError(Exception):
    """The gateway could not be asked, or answered with something unusable."""


class UsageError(Exception):
    """A flag's value is unusable; the message says which and why."""


def register(commands: Any) -> None:
    """Add the ``attest`` command and its ``verify`` and ``verify-quote`` actions."""
    # Any: argparse's subparsers action type is private.
    parser: argparse.ArgumentParser = commands.add_parser(
        "attest", help="check a gateway's attestation report or a TDX quote"
    )
    actions = parser.add_subparsers(dest="attest_command", required=True, metavar="ACTION")
    verify: argparse.ArgumentParser = actions.add_parser(
        "verify",
        help="fetch a report for a fresh nonce and verify it",
        description="Fetch an attestation report for a fresh nonce, check that it is bound\n"
        "to the gateway's key and that nonce, verify its TDX quote to Intel's root of\n"
        "trust, and say what was and was not verified.",
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
    verify.add_argument(
        "--allow-simulated",
        action="store_true",
        help="exit 0 for a simulated report (development only: no hardware evidence)",
    )
    _add_policy_flags(verify)
    verify.set_defaults(handler=run)

    quote: argparse.ArgumentParser = actions.add_parser(
        "verify-quote",
        help="verify a bare TDX quote file against its collateral",
        description="Verify a TDX quote (binary file) to Intel's root of trust, apply the TCB\n"
        "policy and pinned measurements, and print its measurements and REPORTDATA.\n"
        "No gateway and no key binding: compare REPORTDATA yourself.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quote.add_argument("quote_file", metavar="QUOTE_FILE", help="the raw TDX quote")
    _add_policy_flags(quote)
    quote.set_defaults(handler=run_quote)


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    policy = parser.add_argument_group("TDX verification policy")
    policy.add_argument(
        "--collateral",
        metavar="FILE",
        help="the quote's DCAP collateral (JSON) for offline verification; default: the "
        "collateral the gateway attached, else fetched from --pccs-url",
    )
    policy.add_argument(
        "--pccs-url",
        metavar="URL",
        default=INTEL_PCS_URL,
        help=f"PCS/PCCS to fetch collateral from (API v4; default {INTEL_PCS_URL})",
    )
    policy.add_argument(
        "--offline",
        action="store_true",
        help="never fetch collateral (without --collateral or attached collateral: fails)",
    )
    policy.add_argument(
        "--at",
        metavar="ISO-TIME",
        help="verify as of this time (e.g. 2025-07-01T00:00:00Z); default: now",
    )
    policy.add_argument(
        "--allow-tcb-status",
        metavar="STATUS",
        action="append",
        default=[],
        choices=TCB_STATUSES,
        help="also accept this TCB status (repeatable; default: UpToDate only, always accepted)",
    )
    policy.add_argument(
        "--expect-measurements",
        metavar="FILE",
        help='JSON object of expected values: {"mrtd": HEX, "rtmr0": HEX, ...}',
    )
    for name in MEASUREMENT_NAMES:
        policy.add_argument(
            f"--expect-{name}",
            metavar="HEX",
            help=f"expected {name.upper()} (48 bytes of hex); overrides the file",
        )


def policy_from_args(args: argparse.Namespace) -> TdxPolicy:
    """The TDX policy the flags describe.

    Raises:
        UsageError: A file cannot be read, or a value is malformed.
    """
    expected: dict[str, str] = {}
    if args.expect_measurements:
        expected.update(_measurements_file(args.expect_measurements))
    for name in MEASUREMENT_NAMES:
        value: str | None = getattr(args, f"expect_{name}")
        if value:
            expected[name] = value
    collateral = _read_text(args.collateral, "--collateral") if args.collateral else None
    if args.pccs_url and not args.pccs_url.startswith(("http://", "https://")):
        raise UsageError("--pccs-url must start with http:// or https://")
    pccs_url: str | None = None if args.offline else (args.pccs_url or None)
    try:
        return TdxPolicy(
            accepted_tcb_statuses=frozenset({"UpToDate", *args.allow_tcb_status}),
            measurements=expected,
            at=_parse_time(args.at) if args.at else None,
            collateral=collateral,
            pccs_url=pccs_url,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _measurements_file(path: str) -> dict[str, str]:
    try:
        value: object = json.loads(_read_text(path, "--expect-measurements"))
    except ValueError:
        raise UsageError(f"--expect-measurements: {path} is not JSON") from None
    if not isinstance(value, dict):
        raise UsageError(f"--expect-measurements: {path} is not a JSON object")
    items = cast(dict[object, object], value)
    result: dict[str, str] = {}
    for key, item in items.items():
        if not isinstance(item, str):
            raise UsageError(f"--expect-measurements: {key} is not a hex string")
        result[str(key).lower()] = item
    return result


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"{flag}: cannot read {path}: {reason}") from None


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at: {text!r} is not an ISO time") from None
    if moment.tzinfo is None:
        raise UsageError("--at needs a timezone (e.g. 2025-07-01T00:00:00Z)")
    return moment.astimezone(UTC)


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
    try:
        policy = policy_from_args(args)
    except UsageError as exc:
        return fail(COMMAND, str(exc))
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
    verified = check_report(body, public_key=public_key, nonce=nonce, policy=policy)
    return print_outcome(verified, pinned=pinned is not None, allow_simulated=args.allow_simulated)


def run_quote(args: argparse.Namespace) -> int:
    """Verify the quote in ``args.quote_file``; print the outcome and return the exit status."""
    try:
        policy = policy_from_args(args)
        quote = Path(args.quote_file).read_bytes()
    except UsageError as exc:
        return fail(QUOTE_COMMAND, str(exc))
    except OSError as exc:
        return fail(QUOTE_COMMAND, f"cannot read {args.quote_file}: {exc.strerror or exc}")
    result = check_quote(quote, policy)
    return print_quote_outcome(result)


def exit_status(verified: VerifiedReport | QuoteVerification, *, allow_simulated: bool) -> int:
    """The exit status: 0 only when every check passed and nothing was left unverified."""
    if not verified.ok:
        return EXIT_FAILED
    if isinstance(verified, VerifiedReport) and verified.simulated:
        return EXIT_VERIFIED if allow_simulated else EXIT_SIMULATED
    if verified.unverified:
        return EXIT_NOT_FULLY_VERIFIED
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


def print_outcome(verified: VerifiedReport, *, pinned: bool, allow_simulated: bool = False) -> int:
    """Print each check, the measurements and the gaps; return the exit status that says so."""
    status = exit_status(verified, allow_simulated=allow_simulated)
    source = "the pinned key" if pinned else "the key from /v1/public_key"
    bound = f"the report is bound to {source} and to a fresh nonce"
    failed = verified.failed
    if failed is not None:
        print(f"FAIL: {failed.name}: {failed.detail}")
    elif verified.simulated:
        print(f"SIMULATED: {bound}, but it is {SIMULATED_NOTICE}.")
    elif status == EXIT_VERIFIED:
        print(f"OK: {bound}, and its evidence is verified.")
    else:
        print(f"NOT FULLY VERIFIED: {bound}, but {verified.unverified[0]}.")
    report = verified.report
    if report is not None:
        print(f"  verifying_key {report.verifying_key}")
        print(f"  nonce         {report.nonce}")
        print(f"  report_data   {report.report_data}")
        backend = report.details.get("tsm_provider")
        print(f"  provider      {report.provider}{f' ({backend})' if backend else ''}")
    _print_checks(verified.checks)
    if verified.tdx is not None:
        _print_tdx(verified.tdx, verified.pinned)
    for gap in verified.unverified:
        print(f"  NOT verified  {gap}")
    if not pinned and report is not None:
        print("  (pass --public-key to pin the key instead of trusting /v1/public_key)")
    meaning = (
        "simulated accepted (--allow-simulated)"
        if (status == EXIT_VERIFIED and verified.simulated)
        else _MEANINGS[status]
    )
    print(f"exit status {status}: {meaning}")
    return status


def print_quote_outcome(result: QuoteVerification) -> int:
    """Print each check of a bare quote and its measurements; return the exit status."""
    status = exit_status(result, allow_simulated=False)
    failed = result.failed
    if failed is not None:
        print(f"FAIL: {failed.name}: {failed.detail}")
    elif status == EXIT_VERIFIED:
        print("OK: the TDX quote verifies to Intel's root and meets the policy.")
    else:
        print(f"NOT FULLY VERIFIED: the TDX quote verifies, but {result.unverified[0]}.")
    _print_checks(result.checks)
    if result.tdx is not None:
        _print_tdx(result.tdx, result.pinned)
        print(f"  REPORTDATA    {result.tdx.report_data}")
        print("  (no key binding for a bare quote: compare REPORTDATA with what you expect)")
    for gap in result.unverified:
        print(f"  NOT verified  {gap}")
    print(f"exit status {status}: {_MEANINGS[status]}")
    return status


def _print_checks(checks: tuple[Check, ...]) -> None:
    for check in checks:
        mark = "passed" if check.passed else "FAILED"
        print(f"  {mark:<6} {check.name}: {check.detail}")


def _print_tdx(tdx: TdxVerification, pinned: tuple[str, ...]) -> None:
    """The verified quote's TCB status and measurements, so they can be recorded and pinned."""
    advisories = ", ".join(tdx.advisory_ids) or "none"
    print(f"  TCB status    {tdx.tcb_status} (advisories: {advisories})")
    print(f"  measurements of the verified TD report ({tdx.report_type}):")
    for name, value in tdx.measurements.items():
        note = "  (pinned)" if name in pinned else ""
        print(f"    {name.upper():<6} {value}{note}")
    # One line of JSON that --expect-measurements reads, to save once the values are known good.
    print(f"  measurements JSON {json.dumps(tdx.measurements)}")
