"""Responses API answers: signed by the gateway's signers, checked by the verifier and the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from nilai.cli import main
from nilai.crypto.keys import Signer
from nilai.crypto.verify import (
    VerificationError,
    verify_any,
    verify_response,
    verify_responses_object,
    verify_responses_stream,
    verify_stream,
)
from nilai.gateway.chat.signing import StreamSigner, sign_completion
from nilai.gateway.responses.signing import ResponseStreamSigner, sign_response

REQUEST = b'{"model":"m","input":"hi","stream":true}'
REQUEST_SHA = hashlib.sha256(REQUEST).hexdigest()


def _response() -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1700000000,
        "model": "m",
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Bonjour wörld", "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": 3,
            "output_tokens": 2,
            "total_tokens": 5,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def _events() -> list[dict[str, Any]]:
    """The events before response.completed, as a model server sends them."""
    in_progress = _response() | {"status": "in_progress", "output": []}
    del in_progress["usage"]
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress"}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": in_progress},
        {"type": "response.in_progress", "response": in_progress},
        {"type": "response.output_item.added", "output_index": 0, "item": item | {"content": []}},
    ]
    events.extend(
        {
            "type": "response.output_text.delta",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": delta,
        }
        for delta in ("Bonjour", " wörld")
    )
    events.append(
        {
            "type": "response.output_text.done",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "text": "Bonjour wörld",
        }
    )
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events


def _completed(sequence_number: int = 6) -> dict[str, Any]:
    return {
        "type": "response.completed",
        "response": _response(),
        "sequence_number": sequence_number,
    }


def _frame(payload: bytes) -> bytes:
    name = json.loads(payload)["type"].encode()
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


def _stream_payloads(
    signer: Signer, *, added: dict[str, object] | None = None, request_sha: str = REQUEST_SHA
) -> list[bytes]:
    stream_signer = ResponseStreamSigner(signer, request_sha, added=added)
    out = [stream_signer.sent(orjson.dumps(event)) for event in _events()]
    out.append(stream_signer.last(_completed()))
    return out


def _stream(signer: Signer, **kwargs: Any) -> bytes:
    return b"".join(_frame(payload) for payload in _stream_payloads(signer, **kwargs))


def _mutate(raw: bytes, index: int) -> bytes:
    replacement = b"X" if raw[index : index + 1] != b"X" else b"Y"
    return raw[:index] + replacement + raw[index + 1 :]


# Round trips


def test_signed_response_verifies(signer: Signer):
    body = sign_response(_response(), signer, REQUEST_SHA)
    verified = verify_responses_object(body, signer.public_key_b64, REQUEST)
    assert (verified.kind, verified.request_sha256) == ("responses", REQUEST_SHA)
    assert verify_any(body, signer.public_key_b64, REQUEST) == verified


def test_signed_stream_verifies(signer: Signer):
    raw = _stream(signer)
    verified = verify_responses_stream(raw, signer.public_key_b64, REQUEST)
    assert (verified.kind, verified.request_sha256) == ("responses stream", REQUEST_SHA)
    assert verify_any(raw, signer.public_key_b64, REQUEST) == verified


def test_stream_with_comments_crlf_and_blank_lines_verifies(signer: Signer):
    raw = b": keep-alive\r\n\r\n" + _stream(signer).replace(b"\n", b"\r\n") + b"\r\n: bye\r\n"
    assert verify_any(raw, signer.public_key_b64).kind == "responses stream"


def test_gateway_fields_from_the_model_server_are_dropped_and_additions_signed(signer: Signer):
    sources = [{"url": "https://example.org", "title": "t"}]
    forged = _response() | {"sources": ["forged"], "request_sha256": "0" * 64, "signature": "x"}
    body = json.loads(sign_response(forged, signer, REQUEST_SHA, added={"sources": sources}))
    assert body["sources"] == sources
    assert body["request_sha256"] == REQUEST_SHA

    stream_signer = ResponseStreamSigner(signer, REQUEST_SHA, added={"sources": sources})
    completed = _completed() | {"sources": ["forged"], "signature": "x"}
    completed["response"]["request_sha256"] = "0" * 64
    earlier = [stream_signer.sent(orjson.dumps(event)) for event in _events()]
    last = json.loads(stream_signer.last(completed))
    assert "sources" not in last
    assert last["response"]["sources"] == sources
    assert "request_sha256" not in last["response"]
    assert last["request_sha256"] == REQUEST_SHA
    raw = b"".join(_frame(p) for p in [*earlier, orjson.dumps(last)])
    assert verify_responses_stream(raw, signer.public_key_b64, REQUEST).kind == "responses stream"


def test_signers_refuse_what_is_not_a_response(signer: Signer):
    from nilai.errors import UpstreamProtocolError

    with pytest.raises(UpstreamProtocolError):
        sign_response(_response() | {"object": "chat.completion"}, signer, REQUEST_SHA)
    with pytest.raises(UpstreamProtocolError):
        ResponseStreamSigner(signer, REQUEST_SHA).last(_events()[-1])
    with pytest.raises(UpstreamProtocolError):
        ResponseStreamSigner(signer, REQUEST_SHA).last(_completed() | {"response": None})


# Changed bytes


def test_any_changed_byte_of_the_response_fails(signer: Signer):
    body = sign_response(_response(), signer, REQUEST_SHA)
    for index in range(len(body)):
        with pytest.raises(VerificationError):
            verify_any(_mutate(body, index), signer.public_key_b64)


def test_any_changed_byte_of_any_stream_payload_fails(signer: Signer):
    payloads = _stream_payloads(signer)
    for number, payload in enumerate(payloads):
        for index in range(len(payload)):
            changed = list(payloads)
            changed[number] = _mutate(payload, index)
            raw = b"".join(
                b"event: " + _name(p) + b"\ndata: " + c + b"\n\n"
                for p, c in zip(payloads, changed, strict=True)
            )
            with pytest.raises(VerificationError):
                verify_any(raw, signer.public_key_b64)


def _name(payload: bytes) -> bytes:
    return json.loads(payload)["type"].encode()


# Events added, renamed, dropped, reordered


def _split(raw: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in raw.split(b"\n\n") if event]


@pytest.mark.parametrize("position", [0, 3, 6])
def test_injected_unsigned_event_fails(signer: Signer, position: int):
    events = _split(_stream(signer))
    fake = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0}
    events.insert(position, _frame(orjson.dumps(fake | {"content_index": 0, "delta": "!"})))
    with pytest.raises(VerificationError):
        verify_responses_stream(b"".join(events), signer.public_key_b64)


def test_injected_signed_event_fails(signer: Signer):
    events = _split(_stream(signer))
    events.insert(4, events[3])  # a genuine signed delta, replayed
    with pytest.raises(VerificationError):
        verify_responses_stream(b"".join(events), signer.public_key_b64)


def test_renamed_event_fails(signer: Signer):
    raw = _stream(signer)
    renamed = raw.replace(b"event: response.output_text.delta", b"event: response.refusal.delta", 1)
    assert renamed != raw
    with pytest.raises(VerificationError, match="named"):
        verify_responses_stream(renamed, signer.public_key_b64)


def test_event_without_a_name_fails(signer: Signer):
    raw = _stream(signer).replace(b"event: response.in_progress\n", b"", 1)
    with pytest.raises(VerificationError):
        verify_any(raw, signer.public_key_b64)


@pytest.mark.parametrize("dropped", [0, 3, 5, 6])
def test_dropped_event_fails(signer: Signer, dropped: int):
    events = _split(_stream(signer))
    del events[dropped]
    with pytest.raises(VerificationError):
        verify_responses_stream(b"".join(events), signer.public_key_b64)


def test_reordered_events_fail(signer: Signer):
    events = _split(_stream(signer))
    events[3], events[4] = events[4], events[3]
    with pytest.raises(VerificationError):
        verify_responses_stream(b"".join(events), signer.public_key_b64)


def test_error_event_fails(signer: Signer):
    error = {"type": "error", "code": "x", "message": "boom", "sequence_number": 7}
    raw = _stream(signer) + b"event: error\ndata: " + orjson.dumps(error) + b"\n\n"
    with pytest.raises(VerificationError, match="error"):
        verify_responses_stream(raw, signer.public_key_b64)


def test_done_fails(signer: Signer):
    raw = _stream(signer) + b"data: [DONE]\n\n"
    with pytest.raises(VerificationError):
        verify_responses_stream(raw, signer.public_key_b64)
    with pytest.raises(VerificationError):
        verify_any(raw, signer.public_key_b64)


def test_named_done_fails(signer: Signer):
    raw = _stream(signer) + b"event: response.completed\ndata: [DONE]\n\n"
    with pytest.raises(VerificationError, match="DONE"):
        verify_responses_stream(raw, signer.public_key_b64)


def test_stream_not_ending_with_a_blank_line_fails(signer: Signer):
    with pytest.raises(VerificationError, match="blank line"):
        verify_responses_stream(_stream(signer).removesuffix(b"\n"), signer.public_key_b64)


@pytest.mark.parametrize("extra", [b"id: 1\n", b"retry: 5\n", b"data: {}\n", b"event: x\n"])
def test_event_with_an_extra_field_fails(signer: Signer, extra: bytes):
    events = _split(_stream(signer))
    events[2] = extra + events[2]
    with pytest.raises(VerificationError):
        verify_responses_stream(b"".join(events), signer.public_key_b64)


def test_data_before_event_line_fails(signer: Signer):
    events = _split(_stream(signer))
    name_line, data_line, _ = events[2].split(b"\n", 2)
    events[2] = data_line + b"\n" + name_line + b"\n\n"
    with pytest.raises(VerificationError, match="one event line"):
        verify_responses_stream(b"".join(events), signer.public_key_b64)


# Duplicate keys


def test_duplicate_key_in_the_response_fails(signer: Signer):
    body = sign_response(_response(), signer, REQUEST_SHA)
    duplicated = body.replace(b'"model":"m"', b'"model":"m","model":"m"', 1)
    with pytest.raises(VerificationError, match="duplicate"):
        verify_any(duplicated, signer.public_key_b64)


@pytest.mark.parametrize("number", [2, 6])
def test_duplicate_key_in_a_stream_payload_fails(signer: Signer, number: int):
    payloads = _stream_payloads(signer)
    payloads[number] = payloads[number].replace(
        b'"sequence_number":', b'"sequence_number":0,"sequence_number":', 1
    )
    raw = b"".join(_frame(p) for p in payloads)
    with pytest.raises(VerificationError, match="duplicate"):
        verify_responses_stream(raw, signer.public_key_b64)


# Domains: nothing signed as one kind passes as another


def test_chat_completion_does_not_pass_as_a_response(signer: Signer):
    chat = json.loads(
        sign_completion(
            {"object": "chat.completion", "choices": [], "model": "m"}, signer, REQUEST_SHA
        )
    )
    relabelled = orjson.dumps(chat | {"object": "response"})
    with pytest.raises(VerificationError, match="signature"):
        verify_responses_object(relabelled, signer.public_key_b64)
    with pytest.raises(VerificationError):
        verify_responses_object(orjson.dumps(chat), signer.public_key_b64)


def test_response_does_not_pass_as_a_chat_completion(signer: Signer):
    body = sign_response(_response(), signer, REQUEST_SHA)
    with pytest.raises(VerificationError):
        verify_response(body, signer.public_key_b64)
    relabelled = orjson.dumps(json.loads(body) | {"object": "chat.completion"})
    with pytest.raises(VerificationError, match="signature"):
        verify_any(relabelled, signer.public_key_b64)


def test_chat_stream_does_not_pass_as_a_responses_stream(signer: Signer):
    chunk = {"object": "chat.completion.chunk", "choices": [], "model": "m"}
    stream_signer = StreamSigner(signer, REQUEST_SHA)
    payloads = [stream_signer.sent(orjson.dumps(chunk)), stream_signer.last(dict(chunk))]
    chat = b"".join(b"data: " + p + b"\n\n" for p in payloads)
    assert verify_stream(chat + b"data: [DONE]\n\n", signer.public_key_b64).kind == "stream"
    with pytest.raises(VerificationError):
        verify_responses_stream(chat, signer.public_key_b64)
    # The same payloads presented as typed events whose name matches a forged type.
    retyped = [orjson.dumps(json.loads(p) | {"type": "response.completed"}) for p in payloads]
    with pytest.raises(VerificationError):
        verify_responses_stream(b"".join(_frame(p) for p in retyped), signer.public_key_b64)


def test_responses_stream_does_not_pass_as_a_chat_stream(signer: Signer):
    payloads = _stream_payloads(signer)
    as_chat = b"".join(b"data: " + p + b"\n\n" for p in payloads) + b"data: [DONE]\n\n"
    with pytest.raises(VerificationError):
        verify_stream(as_chat, signer.public_key_b64)
    with pytest.raises(VerificationError):
        verify_any(as_chat, signer.public_key_b64)


def test_response_reframed_as_a_one_event_stream_fails(signer: Signer):
    body = json.loads(sign_response(_response(), signer, REQUEST_SHA))
    signature = body.pop("signature")
    completed = {"type": "response.completed", "response": body, "signature": signature}
    completed["request_sha256"] = body.pop("request_sha256")
    with pytest.raises(VerificationError, match="signature"):
        verify_responses_stream(_frame(orjson.dumps(completed)), signer.public_key_b64)


def test_completed_response_of_another_kind_fails(signer: Signer):
    stream_signer = ResponseStreamSigner(signer, REQUEST_SHA)
    completed = _completed()
    last = json.loads(stream_signer.last(completed))
    last["response"]["object"] = "chat.completion"
    with pytest.raises(VerificationError, match="not a response"):
        verify_responses_stream(_frame(orjson.dumps(last)), signer.public_key_b64)


def test_other_key_fails(signer: Signer, other_signer: Signer):
    with pytest.raises(VerificationError, match="signature"):
        verify_any(_stream(signer), other_signer.public_key_b64)
    with pytest.raises(VerificationError, match="signature"):
        verify_any(sign_response(_response(), signer, REQUEST_SHA), other_signer.public_key_b64)


@pytest.fixture(scope="module")
def other_signer() -> Signer:
    from coincurve import PrivateKey

    return Signer(PrivateKey())


# Request binding


def test_request_mismatch_fails(signer: Signer):
    other = REQUEST + b" "
    with pytest.raises(VerificationError, match="request_sha256"):
        verify_any(sign_response(_response(), signer, REQUEST_SHA), signer.public_key_b64, other)
    with pytest.raises(VerificationError, match="request_sha256"):
        verify_any(_stream(signer), signer.public_key_b64, other)


# The CLI on saved files


@pytest.mark.parametrize("form", ["object", "stream"])
def test_cli_verifies_saved_responses_answers(
    signer: Signer, tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
):
    raw = sign_response(_response(), signer, REQUEST_SHA) if form == "object" else _stream(signer)
    saved, sent, other = tmp_path / "answer", tmp_path / "request", tmp_path / "other"
    saved.write_bytes(raw)
    sent.write_bytes(REQUEST)
    other.write_bytes(REQUEST + b" ")
    key = ["--public-key", signer.public_key_b64]
    assert main(["verify", str(saved), *key, "--request", str(sent)]) == 0
    kind = "responses" if form == "object" else "responses stream"
    assert capsys.readouterr().out.startswith(f"OK: {kind} signature valid and bound")
    assert main(["verify", str(saved), *key, "--request", str(other)]) == 1
    tampered = tmp_path / "tampered"
    tampered.write_bytes(raw.replace("wörld".encode(), b"world", 1))
    assert main(["verify", str(tampered), *key]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAIL: ")
