"""The Responses API signers: the exact messages they sign and what they refuse."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import orjson
import pytest
from coincurve import PublicKey

from nilai.crypto.canonical import canonical_json
from nilai.crypto.domains import SignatureDomain
from nilai.crypto.keys import Signer
from nilai.errors import UpstreamProtocolError
from nilai.gateway.responses.signing import ResponseStreamSigner, sign_response

REQUEST_SHA = hashlib.sha256(b"{}").hexdigest()


def _valid(signer: Signer, signature: str, message: bytes) -> bool:
    der = base64.b64decode(signature)
    return PublicKey(signer.public_key_bytes).verify(
        der, message, hasher=lambda data: hashlib.sha256(data).digest()
    )


def _completed(response: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.completed", "response": response, "sequence_number": 2}


def test_sign_response_signs_the_response_domain(signer: Signer):
    body = json.loads(sign_response({"id": "resp_1", "output": []}, signer, REQUEST_SHA))
    assert body["object"] == "response"  # claimed when the model server left it out
    signature = body.pop("signature")
    assert body["request_sha256"] == REQUEST_SHA
    assert _valid(signer, signature, SignatureDomain.RESPONSE + canonical_json(body))
    assert not _valid(signer, signature, SignatureDomain.CHAT_COMPLETION + canonical_json(body))


def test_sign_response_refuses_another_kind(signer: Signer):
    with pytest.raises(UpstreamProtocolError):
        sign_response({"object": "chat.completion"}, signer, REQUEST_SHA)


def test_stream_signer_signs_every_payload_then_the_completed_event(signer: Signer):
    stream_signer = ResponseStreamSigner(signer, REQUEST_SHA, added={"sources": ["s"]})
    earlier = [b'{"type":"response.created","sequence_number":0}', b'{"type":"x"}']
    assert [stream_signer.sent(p) for p in earlier] == earlier
    completed = _completed({"id": "resp_1", "sources": ["forged"]}) | {"signature": "forged"}
    last = json.loads(stream_signer.last(completed))
    signature = last.pop("signature")
    assert last["request_sha256"] == REQUEST_SHA
    assert last["response"] == {"id": "resp_1", "object": "response", "sources": ["s"]}
    message = (
        SignatureDomain.RESPONSE_STREAM
        + b"".join(p + b"\n" for p in earlier)
        + canonical_json(last)
    )
    assert _valid(signer, signature, message)
    chat_tagged = SignatureDomain.CHAT_COMPLETION_CHUNK + message.removeprefix(
        SignatureDomain.RESPONSE_STREAM
    )
    assert not _valid(signer, signature, chat_tagged)


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "response.output_text.done", "response": {}},
        {"type": "error", "code": "x", "message": "m"},
        {"response": {}},
        {"type": "response.completed"},
        {"type": "response.completed", "response": []},
        _completed({"object": "chat.completion"}),
    ],
)
def test_stream_signer_refuses_a_last_payload_that_is_not_a_completed_response(
    signer: Signer, payload: dict[str, Any]
):
    with pytest.raises(UpstreamProtocolError):
        ResponseStreamSigner(signer, REQUEST_SHA).last(payload)


def test_last_payload_is_one_line(signer: Signer):
    out = ResponseStreamSigner(signer, REQUEST_SHA).last(_completed({"text": "a\u2028b\nc"}))
    assert b"\n" not in out
    assert "\u2028".encode() not in out
    assert json.loads(out)["response"]["text"] == "a\u2028b\nc"
    assert orjson.loads(out) == json.loads(out)
