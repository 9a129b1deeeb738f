"""Check signed answers against the gateway's public key (DESIGN §3).

Two forms are accepted: a non-streaming response body (one JSON object with ``signature``) and
a recorded SSE stream (the raw text the gateway sent, ``data: ...`` lines).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from coincurve import PublicKey

from nilai.crypto.canonical import canonical_json


class VerificationError(Exception):
    """The answer is not what the key signed."""


@dataclass(frozen=True)
class Verified:
    """What a successful check established."""

    kind: str
    request_sha256: str | None


def verify_response(body: bytes, public_key_b64: str, request: bytes | None = None) -> Verified:
    """Verify a saved non-streaming response body."""
    obj = _load_object(body)
    message, signature = _split_signature(obj)
    _check_signature(canonical_json(message), signature, public_key_b64)
    return _check_request(Verified("response", message.get("request_sha256")), request)


def verify_stream(raw: bytes, public_key_b64: str, request: bytes | None = None) -> Verified:
    """Verify a recorded SSE stream: every payload before the signed last chunk is covered."""
    payloads = sse_payloads(raw)
    if not payloads:
        raise VerificationError("the stream holds no data events")
    *earlier, last = payloads
    obj = _load_object(last)
    message, signature = _split_signature(obj)
    signed = b"".join(payload + b"\n" for payload in earlier) + canonical_json(message)
    _check_signature(signed, signature, public_key_b64)
    return _check_request(Verified("stream", message.get("request_sha256")), request)


def verify_any(raw: bytes, public_key_b64: str, request: bytes | None = None) -> Verified:
    """Verify either form, telling them apart by their first bytes."""
    if raw.lstrip().startswith(b"data:"):
        return verify_stream(raw, public_key_b64, request)
    return verify_response(raw, public_key_b64, request)


def sse_payloads(raw: bytes) -> list[bytes]:
    """Return each ``data:`` payload of an SSE text, in order, without ``[DONE]``."""
    payloads: list[bytes] = []
    for raw_line in raw.split(b"\n"):
        line = raw_line.removesuffix(b"\r")
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].removeprefix(b" ")
        if payload != b"[DONE]":
            payloads.append(payload)
    return payloads


def _load_object(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise VerificationError("the signed object is not a JSON object")
    return obj  # pyright: ignore[reportUnknownVariableType]


def _split_signature(obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
    signature = obj.get("signature")
    if not isinstance(signature, str):
        raise VerificationError("no signature field in the signed object")
    return {key: value for key, value in obj.items() if key != "signature"}, signature


def _check_signature(message: bytes, signature_b64: str, public_key_b64: str) -> None:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key = PublicKey(base64.b64decode(public_key_b64, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise VerificationError(f"malformed signature or public key: {exc}") from exc
    try:
        valid = key.verify(signature, message, hasher=lambda data: hashlib.sha256(data).digest())
    except ValueError:
        valid = False
    if not valid:
        raise VerificationError("signature does not match the content and public key")


def _check_request(verified: Verified, request: bytes | None) -> Verified:
    if request is None:
        return verified
    expected = hashlib.sha256(request).hexdigest()
    if verified.request_sha256 != expected:
        raise VerificationError("request_sha256 does not match the given request body")
    return verified
