"""``nilai verify``: check a saved answer (JSON body or recorded SSE stream).

Chat completions and Responses API answers are both accepted, streamed or not; the form is
told from the file itself (``verify_any``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import httpx

from nilai.crypto.verify import VerificationError, verify_any


def register(commands: Any) -> None:
    """Add the ``verify`` subcommand."""
    # Any: argparse's subparsers action type is private.
    parser: argparse.ArgumentParser = commands.add_parser(
        "verify",
        help="check the signature of a saved answer or recorded stream "
        "(chat completions or Responses API)",
    )
    parser.add_argument(
        "file",
        help="saved answer body (a chat completion or a Responses API response), or a "
        "stream's bytes exactly as received ('-' reads stdin)",
    )
    key = parser.add_mutually_exclusive_group(required=True)
    key.add_argument("--public-key", help="the gateway's public key (base64)")
    key.add_argument("--gateway", help="gateway base URL; its /v1/public_key is fetched")
    parser.add_argument("--request", help="the request body that was sent, to check the binding")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print OK and return 0 when the signature holds, else print why and return 1."""
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        request = Path(args.request).read_bytes() if args.request else None
    except OSError as exc:
        print(f"FAIL: {unreadable(exc)}")
        return 2
    try:
        public_key = args.public_key or fetch_public_key(str(args.gateway))
    except (httpx.HTTPError, ValueError, TypeError) as exc:
        print(f"FAIL: cannot get the public key: {exc}")
        return 2
    try:
        verified = verify_any(raw, public_key, request)
    except VerificationError as exc:
        print(f"FAIL: {exc}")
        return 1
    bound = " and bound to the given request" if request is not None else ""
    print(f"OK: {verified.kind} signature valid{bound} (request_sha256 {verified.request_sha256})")
    return 0


def unreadable(exc: OSError) -> str:
    """``cannot read PATH: REASON`` in one line, without Python's errno prefix."""
    reason = exc.strerror or type(exc).__name__
    return f"cannot read {exc.filename}: {reason}"


def fetch_public_key(gateway: str) -> str:
    """Read ``/v1/public_key`` from a gateway."""
    response = httpx.get(f"{gateway.rstrip('/')}/v1/public_key", timeout=10.0)
    response.raise_for_status()
    key: Any = response.json()  # Any: checked below
    if not isinstance(key, str):
        raise TypeError("/v1/public_key did not return a string")
    return key
