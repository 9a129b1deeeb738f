import base64
import hashlib
import json
from typing import Any

import orjson
import pytest
from coincurve import PrivateKey

from nilai.crypto.canonical import canonical_json
from nilai.crypto.domains import SignatureDomain
from nilai.crypto.keys import Signer
from nilai.crypto.verify import (
    VerificationError,
    sse_payloads,
    verify_any,
    verify_response,
    verify_stream,
)
from nilai.gateway.chat.signing import StreamSigner, sign_completion

REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
REQUEST_SHA = hashlib.sha256(REQUEST).hexdigest()


@pytest.fixture(scope="module")
def other_signer() -> Signer:
    return Signer(PrivateKey())


def _completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Bonjour, ça va? 42"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def _chunk(content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _signed_response(signer: Signer) -> bytes:
    return sign_completion(_completion(), signer, REQUEST_SHA)


def _signed_stream(signer: Signer, request_sha: str = REQUEST_SHA) -> bytes:
    stream_signer = StreamSigner(signer, request_sha)
    earlier = [orjson.dumps(_chunk(text)) for text in ("Hel", "lo", " wörld")]
    out = [stream_signer.sent(payload) for payload in earlier]
    out.append(stream_signer.last(_chunk(None, "stop")))
    return b"".join(b"data: " + p + b"\n\n" for p in out) + b"data: [DONE]\n\n"


def _mutate(raw: bytes, index: int) -> bytes:
    replacement = b"X" if raw[index : index + 1] != b"X" else b"Y"
    return raw[:index] + replacement + raw[index + 1 :]


def _content_positions(raw: bytes, needle: bytes) -> list[int]:
    start = raw.index(needle)
    return list(range(start, start + len(needle)))


# --- non-streaming responses ----------------------------------------------------------------


def test_valid_response_verifies(signer: Signer):
    verified = verify_response(_signed_response(signer), signer.public_key_b64)
    assert verified.kind == "response"
    assert verified.request_sha256 == REQUEST_SHA


def test_response_signature_covers_tag_and_canonical_json_without_signature(signer: Signer):
    body = json.loads(_signed_response(signer))
    signature = body.pop("signature")
    tag = b"nilai-sig/v1 chat.completion\n"
    assert signature == signer.sign_digest(hashlib.sha256(tag + canonical_json(body)).digest())
    assert signature == signer.sign(SignatureDomain.CHAT_COMPLETION, canonical_json(body))


def test_response_verifies_regardless_of_whitespace_and_key_order(signer: Signer):
    obj = json.loads(_signed_response(signer))
    reordered = dict(reversed(list(obj.items())))
    pretty = json.dumps(reordered, indent=2, ensure_ascii=True).encode()
    assert verify_response(pretty, signer.public_key_b64).kind == "response"


def test_any_changed_content_byte_fails(signer: Signer):
    raw = _signed_response(signer)
    positions = _content_positions(raw, "Bonjour, ça va? 42".encode())
    positions += _content_positions(raw, b'"prompt_tokens":5')
    positions += _content_positions(raw, b'"request_sha256":"' + REQUEST_SHA[:6].encode())
    assert len(positions) > 30
    for index in positions:
        with pytest.raises(VerificationError):
            verify_response(_mutate(raw, index), signer.public_key_b64)


def test_response_with_added_field_fails(signer: Signer):
    obj = json.loads(_signed_response(signer))
    obj["extra"] = 1
    with pytest.raises(VerificationError, match="does not match"):
        verify_response(json.dumps(obj).encode(), signer.public_key_b64)


def test_response_without_signature_fails(signer: Signer):
    obj = json.loads(_signed_response(signer))
    del obj["signature"]
    with pytest.raises(VerificationError, match="no signature"):
        verify_response(json.dumps(obj).encode(), signer.public_key_b64)


def test_response_with_non_string_signature_fails(signer: Signer):
    obj = json.loads(_signed_response(signer))
    obj["signature"] = 12
    with pytest.raises(VerificationError, match="no signature"):
        verify_response(json.dumps(obj).encode(), signer.public_key_b64)


@pytest.mark.parametrize("bad", ["not base64!!", "AAA", "é", ""])
def test_response_with_malformed_signature_fails(signer: Signer, bad: str):
    obj = json.loads(_signed_response(signer))
    obj["signature"] = bad
    with pytest.raises(VerificationError):
        verify_response(json.dumps(obj).encode(), signer.public_key_b64)


def test_response_with_valid_base64_but_not_der_fails(signer: Signer):
    obj = json.loads(_signed_response(signer))
    obj["signature"] = base64.b64encode(b"\x01" * 70).decode()
    with pytest.raises(VerificationError):
        verify_response(json.dumps(obj).encode(), signer.public_key_b64)


def test_response_under_wrong_key_fails(signer: Signer, other_signer: Signer):
    with pytest.raises(VerificationError, match="does not match"):
        verify_response(_signed_response(signer), other_signer.public_key_b64)


@pytest.mark.parametrize(
    "public_key", ["!!!", base64.b64encode(b"\x02" + b"\x00" * 10).decode(), ""]
)
def test_malformed_public_key_fails(signer: Signer, public_key: str):
    with pytest.raises(VerificationError):
        verify_response(_signed_response(signer), public_key)


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_non_object_json_fails(signer: Signer, raw: bytes):
    with pytest.raises(VerificationError, match="not a JSON object"):
        verify_response(raw, signer.public_key_b64)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe"])
def test_invalid_json_fails(signer: Signer, raw: bytes):
    with pytest.raises(VerificationError, match="not valid JSON"):
        verify_response(raw, signer.public_key_b64)


def test_response_request_binding(signer: Signer):
    raw = _signed_response(signer)
    assert verify_response(raw, signer.public_key_b64, request=REQUEST).request_sha256
    with pytest.raises(VerificationError, match="request_sha256"):
        verify_response(raw, signer.public_key_b64, request=REQUEST + b" ")


def test_response_without_request_hash_fails_even_without_a_request(signer: Signer):
    body = _completion()
    body["signature"] = signer.sign(SignatureDomain.CHAT_COMPLETION, canonical_json(body))
    raw = json.dumps(body).encode()
    for request in (None, REQUEST):
        with pytest.raises(VerificationError, match="no request_sha256"):
            verify_response(raw, signer.public_key_b64, request=request)


# --- streams --------------------------------------------------------------------------------


def test_valid_stream_verifies(signer: Signer):
    verified = verify_stream(_signed_stream(signer), signer.public_key_b64)
    assert verified.kind == "stream"
    assert verified.request_sha256 == REQUEST_SHA


def test_stream_signature_matches_design_message(signer: Signer):
    """M = TAG + b"".join(p + b"\\n" for p in earlier) + canonical(last without signature)."""
    payloads = sse_payloads(_signed_stream(signer))
    *earlier, last = payloads
    last_obj = json.loads(last)
    signature = last_obj.pop("signature")
    assert last_obj["request_sha256"] == REQUEST_SHA
    message = b"".join(p + b"\n" for p in earlier) + canonical_json(last_obj)
    tag = b"nilai-sig/v1 chat.completion.chunk\n"
    assert signature == signer.sign_digest(hashlib.sha256(tag + message).digest())


def test_stream_with_crlf_framing_verifies(signer: Signer):
    raw = _signed_stream(signer).replace(b"\n", b"\r\n")
    assert verify_stream(raw, signer.public_key_b64).kind == "stream"


def test_stream_without_done_marker_verifies(signer: Signer):
    raw = _signed_stream(signer).removesuffix(b"data: [DONE]\n\n")
    assert verify_stream(raw, signer.public_key_b64).kind == "stream"


def test_any_changed_byte_of_an_earlier_payload_fails(signer: Signer):
    raw = _signed_stream(signer)
    positions = _content_positions(raw, b'"content":"Hel"')
    positions += _content_positions(raw, b'"content":" w')
    positions += _content_positions(raw, b'"created":1700000000')
    for index in positions:
        with pytest.raises(VerificationError):
            verify_stream(_mutate(raw, index), signer.public_key_b64)


def test_any_changed_byte_of_the_last_chunk_fails(signer: Signer):
    raw = _signed_stream(signer)
    last_start = raw.rindex(b"data: {")
    positions = _content_positions(raw[last_start:], b'"finish_reason":"stop"')
    for offset in positions:
        with pytest.raises(VerificationError):
            verify_stream(_mutate(raw, last_start + offset), signer.public_key_b64)


def test_whitespace_change_in_an_earlier_payload_fails(signer: Signer):
    # Earlier payloads are covered byte for byte, not canonically.
    raw = _signed_stream(signer).replace(b'"content":"Hel"', b'"content": "Hel"', 1)
    with pytest.raises(VerificationError, match="does not match"):
        verify_stream(raw, signer.public_key_b64)


def test_dropped_earlier_payload_fails(signer: Signer):
    events = _signed_stream(signer).split(b"\n\n")
    raw = b"\n\n".join(events[:1] + events[2:])
    with pytest.raises(VerificationError, match="does not match"):
        verify_stream(raw, signer.public_key_b64)


def test_reordered_payloads_fail(signer: Signer):
    events = _signed_stream(signer).split(b"\n\n")
    events[0], events[1] = events[1], events[0]
    with pytest.raises(VerificationError, match="does not match"):
        verify_stream(b"\n\n".join(events), signer.public_key_b64)


def test_stream_under_wrong_key_fails(signer: Signer, other_signer: Signer):
    with pytest.raises(VerificationError, match="does not match"):
        verify_stream(_signed_stream(signer), other_signer.public_key_b64)


def test_stream_without_signature_fails(signer: Signer):
    raw = b"data: " + orjson.dumps(_chunk("a")) + b"\n\ndata: [DONE]\n\n"
    with pytest.raises(VerificationError, match="no signature"):
        verify_stream(raw, signer.public_key_b64)


def test_stream_without_data_events_fails(signer: Signer):
    with pytest.raises(VerificationError, match="no data events"):
        verify_stream(b": comment\n\ndata: [DONE]\n\n", signer.public_key_b64)


def test_stream_whose_last_payload_is_not_an_object_fails(signer: Signer):
    raw = _signed_stream(signer).replace(b"data: [DONE]", b"data: [1]")
    with pytest.raises(VerificationError, match="not a JSON object"):
        verify_stream(raw, signer.public_key_b64)


def test_stream_request_binding(signer: Signer):
    raw = _signed_stream(signer)
    assert verify_stream(raw, signer.public_key_b64, request=REQUEST).kind == "stream"
    with pytest.raises(VerificationError, match="request_sha256"):
        verify_stream(raw, signer.public_key_b64, request=b"{}")


def test_stream_bound_to_other_request_fails_binding_but_signature_is_valid(signer: Signer):
    raw = _signed_stream(signer, hashlib.sha256(b"other").hexdigest())
    assert verify_stream(raw, signer.public_key_b64).kind == "stream"
    with pytest.raises(VerificationError, match="request_sha256"):
        verify_stream(raw, signer.public_key_b64, request=REQUEST)
    assert verify_stream(raw, signer.public_key_b64, request=b"other").kind == "stream"


# --- verify_any and sse_payloads ------------------------------------------------------------


def test_verify_any_tells_the_forms_apart(signer: Signer):
    assert verify_any(_signed_response(signer), signer.public_key_b64).kind == "response"
    assert verify_any(_signed_stream(signer), signer.public_key_b64).kind == "stream"
    leading = b"\r\n\n" + _signed_stream(signer)
    assert verify_any(leading, signer.public_key_b64, request=REQUEST).kind == "stream"


def test_verify_any_propagates_failures(signer: Signer, other_signer: Signer):
    with pytest.raises(VerificationError):
        verify_any(_signed_response(signer), other_signer.public_key_b64)
    with pytest.raises(VerificationError):
        verify_any(_signed_stream(signer), other_signer.public_key_b64)
    with pytest.raises(VerificationError):
        verify_any(_signed_response(signer), signer.public_key_b64, request=b"x")


def test_sse_payloads_extracts_data_lines_in_order():
    raw = (
        b": keep-alive\n\n"
        b"data: one\n\n"
        b"event: message\r\ndata:two\r\n\r\n"
        b"id: 3\ndata:  three\n\n"
        b"data: [DONE]\n\n"
    )
    assert sse_payloads(raw) == [b"one", b"two", b" three"]


def test_sse_payloads_of_empty_input():
    assert sse_payloads(b"") == []
    assert sse_payloads(b"data: [DONE]\n\n") == []
