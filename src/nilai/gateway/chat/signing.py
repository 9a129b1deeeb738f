"""Signing answers as DESIGN §3 specifies, for whole responses and for streams."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from nilai.crypto.canonical import canonical_json
from nilai.crypto.domains import (
    CHAT_COMPLETION_CHUNK_OBJECT,
    CHAT_COMPLETION_OBJECT,
    SignatureDomain,
)
from nilai.crypto.keys import Signer
from nilai.errors import UpstreamProtocolError
from nilai.upstream.sse import one_line

GATEWAY_FIELDS = ("sources", "tool_rounds", "request_sha256", "signature")
"""Fields only the gateway sets on what it signs (``sources``: a web search's pages;
``tool_rounds``: the tool calls it ran). Whatever a model server sends under these names is
dropped, so that it cannot get, say, sources or tool results of its own making signed by the
gateway."""


def drop_gateway_fields(obj: dict[str, Any]) -> bool:
    """Remove the gateway's own fields from a model server's object; True if any were there."""
    found = [name for name in GATEWAY_FIELDS if name in obj]
    for name in found:
        del obj[name]
    return bool(found)


def sign_completion(
    body: dict[str, Any],
    signer: Signer,
    request_sha256: str,
    *,
    added: Mapping[str, object] | None = None,
) -> bytes:
    """Bind ``body`` to the request, sign its canonical JSON, and return the bytes to send.

    ``added`` are fields the gateway puts in the signed object itself (``sources``).

    Raises:
        UpstreamProtocolError: The model server's answer says it is not a chat completion.
    """
    return sign_object(
        body,
        signer,
        request_sha256,
        kind=CHAT_COMPLETION_OBJECT,
        domain=SignatureDomain.CHAT_COMPLETION,
        added=added,
    )


def sign_object(
    body: dict[str, Any],
    signer: Signer,
    request_sha256: str,
    *,
    kind: str,
    domain: SignatureDomain,
    added: Mapping[str, object] | None = None,
) -> bytes:
    """Sign a whole answer of any API: ``body`` claimed as ``kind``, in ``domain``.

    Raises:
        UpstreamProtocolError: ``body`` says it is another kind.
    """
    claim_object(body, kind)
    drop_gateway_fields(body)
    body.update(added or {})
    body["request_sha256"] = request_sha256
    body["signature"] = signer.sign(domain, canonical_json(body))
    return orjson.dumps(body)


def claim_object(obj: dict[str, Any], kind: str) -> bool:
    """Make ``obj`` say it is a ``kind`` before it is signed; True when that had to be added.

    The verifier accepts only objects of the kind its mode expects, so that nothing signed as
    one kind passes as another. Model servers set ``object``; one that leaves it out (or sends
    null) still gets a verifiable answer, with the field added.

    Raises:
        UpstreamProtocolError: ``obj`` says it is another kind.
    """
    found = obj.get("object")
    if found == kind:
        return False
    if found is not None:
        # Signing it anyway would vouch for an object the client's SDK does not expect.
        raise UpstreamProtocolError(f"The model server sent an object that is not a {kind}.")
    obj["object"] = kind
    return True


class SignedSequence:
    r"""The running signature every signed stream is made of (DESIGN §3), whatever its API.

    The signed message is the stream's domain tag, then
    ``b"".join(p + b"\\n" for p in earlier) + canonical(last)``; keeping a running SHA-256
    instead of the payloads makes the cost per payload one hash update.
    """

    def __init__(self, signer: Signer, request_sha256: str, domain: SignatureDomain) -> None:
        self._signer = signer
        self._request_sha256 = request_sha256
        self._hash = hashlib.sha256(domain)

    def sent(self, payload: bytes) -> bytes:
        """Account for a payload that goes out unchanged; return it."""
        self._hash.update(payload)
        self._hash.update(b"\n")
        return payload

    def seal(self, last: dict[str, Any]) -> bytes:
        """Bind ``last`` to the request, sign it after every earlier payload, return its bytes."""
        last["request_sha256"] = self._request_sha256
        self._hash.update(canonical_json(last))
        last["signature"] = self._signer.sign_digest(self._hash.digest())
        return one_line(orjson.dumps(last))


class StreamSigner(SignedSequence):
    """Signs a chat stream: every payload a ``chat.completion.chunk``, the last one signed.

    Every payload must be a ``chat.completion.chunk`` (``claim_object``): the caller checks the
    ones it sends as is. ``added`` are fields the gateway puts on the last chunk, inside what
    is signed (``sources``).
    """

    def __init__(
        self, signer: Signer, request_sha256: str, *, added: Mapping[str, object] | None = None
    ) -> None:
        super().__init__(signer, request_sha256, SignatureDomain.CHAT_COMPLETION_CHUNK)
        self._added = dict(added or {})

    def last(self, chunk: dict[str, Any]) -> bytes:
        """Sign ``chunk`` as the final event and return its payload.

        Raises:
            UpstreamProtocolError: The chunk says it is not a chat completion chunk.
        """
        claim_object(chunk, CHAT_COMPLETION_CHUNK_OBJECT)
        drop_gateway_fields(chunk)
        chunk.update(self._added)
        return self.seal(chunk)
