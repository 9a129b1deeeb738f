"""Signing answers as DESIGN §3 specifies, for whole responses and for streams."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from nilai.crypto.canonical import canonical_json
from nilai.crypto.keys import Signer
from nilai.upstream.sse import one_line


def sign_completion(body: dict[str, Any], signer: Signer, request_sha256: str) -> bytes:
    """Bind ``body`` to the request, sign its canonical JSON, and return the bytes to send."""
    body["request_sha256"] = request_sha256
    body["signature"] = signer.sign(canonical_json(body))
    return orjson.dumps(body)


class StreamSigner:
    r"""Hashes every payload as it is sent, then signs the last chunk over all of them.

    The signed message is ``b"".join(p + b"\\n" for p in earlier) + canonical(last)``; keeping
    a running SHA-256 instead of the payloads makes the cost per chunk one hash update.
    """

    def __init__(self, signer: Signer, request_sha256: str) -> None:
        self._signer = signer
        self._request_sha256 = request_sha256
        self._hash = hashlib.sha256()

    def sent(self, payload: bytes) -> bytes:
        """Account for a payload that goes out unchanged; return it."""
        self._hash.update(payload)
        self._hash.update(b"\n")
        return payload

    def last(self, chunk: dict[str, Any]) -> bytes:
        """Sign ``chunk`` as the final event and return its payload."""
        chunk["request_sha256"] = self._request_sha256
        self._hash.update(canonical_json(chunk))
        chunk["signature"] = self._signer.sign_digest(self._hash.digest())
        return one_line(orjson.dumps(chunk))
