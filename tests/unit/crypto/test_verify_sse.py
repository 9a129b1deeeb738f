"""The verifier reads a stream exactly as clients do (DESIGN §3), and rejects ambiguous JSON.

Streams here are genuine: signed with the gateway's own ``StreamSigner``, then tampered with the
way an attacker between the gateway and the client could.
"""

import hashlib
import json
from typing import Any

import orjson
import pytest
from openai._streaming import SSEDecoder

from nilai.crypto.keys import Signer
from nilai.crypto.verify import (
    VerificationError,
    parse_sse,
    signed_payloads,
    verify_any,
    verify_response,
    verify_stream,
)
from nilai.gateway.chat.signing import StreamSigner, sign_completion

REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
REQUEST_SHA = hashlib.sha256(REQUEST).hexdigest()
INJECTED = b"INJECTED "
BOM = "\ufeff".encode()


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-7",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _injected_payload() -> bytes:
    return orjson.dumps(_chunk({"content": INJECTED.decode()}))


def _payloads(signer: Signer) -> list[bytes]:
    """The payloads of a genuine stream as the gateway sends them, the signed one last."""
    stream_signer = StreamSigner(signer, REQUEST_SHA)
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {"content": "Do "},
        {"content": "not "},
        {"content": "take it"},
    ]
    sent = [stream_signer.sent(orjson.dumps(_chunk(delta))) for delta in deltas]
    return [*sent, stream_signer.last(_chunk({"content": "!"}, "stop"))]


def _sse(
    payloads: list[bytes],
    *,
    eol: bytes = b"\n",
    before: dict[int, bytes] | None = None,
    done: bool = True,
) -> bytes:
    """Frame payloads as SSE; ``before[i]`` is inserted raw in front of event ``i``."""
    extra = before or {}
    out = b"".join(extra.get(i, b"") + b"data: " + p + eol + eol for i, p in enumerate(payloads))
    out += extra.get(len(payloads), b"")
    return out + (b"data: [DONE]" + eol + eol if done else b"")


def _sdk_events(raw: bytes, *, byte_by_byte: bool = False) -> list[tuple[str | None, str]]:
    """What the openai SDK's own SSE decoder hands to the client: (event, data) pairs."""
    chunks = [raw[i : i + 1] for i in range(len(raw))] if byte_by_byte else [raw]
    return [(sse.event, sse.data) for sse in SSEDecoder().iter_bytes(iter(chunks))]


def _our_events(raw: bytes) -> list[tuple[str | None, str]]:
    stream = parse_sse(raw.decode())
    return [(event.event_type, data) for event in stream.events if (data := event.data) is not None]


# --- the injection of issue 13 --------------------------------------------------------------

HIDING_LINES = {
    "comment": b": keep-alive\r",
    "event": b"event: x\r",
    "id": b"id: 7\r",
}


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("hiding", HIDING_LINES.values(), ids=HIDING_LINES.keys())
def test_stream_with_event_injected_after_a_cr_line_end_fails(
    signer: Signer, hiding: bytes, eol: bytes
):
    injected = hiding + b"data: " + _injected_payload() + eol + eol
    raw = _sse(_payloads(signer), eol=eol, before={3: injected})
    assert any("INJECTED" in data for _, data in _sdk_events(raw))
    with pytest.raises(VerificationError):
        verify_stream(raw, signer.public_key_b64)


def test_openai_sdk_shows_the_cr_injection_that_the_verifier_rejects(signer: Signer):
    genuine = _sse(_payloads(signer))
    injected = b": keep-alive\rdata: " + _injected_payload() + b"\n\n"
    raw = _sse(_payloads(signer), before={3: injected})
    # The SDK splits lines at CR as the specification says, and hands the client the words.
    contents = [
        json.loads(data)["choices"][0]["delta"]["content"]
        for _, data in _sdk_events(raw)
        if data != "[DONE]"
    ]
    assert "".join(contents) == "Do not INJECTED take it!"
    assert _our_events(raw) == _sdk_events(raw)
    assert verify_stream(genuine, signer.public_key_b64).kind == "stream"
    with pytest.raises(VerificationError):
        verify_stream(raw, signer.public_key_b64)


def test_event_injected_into_a_cr_only_stream_fails_the_signature(signer: Signer):
    raw = _sse(_payloads(signer), eol=b"\r", before={3: b"data: " + _injected_payload() + b"\r\r"})
    with pytest.raises(VerificationError, match="does not match"):
        verify_stream(raw, signer.public_key_b64)


def test_signed_event_hidden_from_lf_only_clients_fails(signer: Signer):
    # A client that splits lines at LF only reads ": x\rdata: ..." as one comment and would
    # silently drop the word "not"; the specification's reading still has every event.
    events = _sse(_payloads(signer)).split(b"\n\n")
    events[2] = b": x\r" + events[2]
    with pytest.raises(VerificationError, match="lone CR"):
        verify_stream(b"\n\n".join(events), signer.public_key_b64)


def test_comment_with_a_unicode_line_separator_fails(signer: Signer):
    # httpx's line decoder (and so httpx-sse) splits lines where str.splitlines does.
    hiding = ": keep-alive\u2028data: ".encode() + _injected_payload() + b"\n\n"
    raw = _sse(_payloads(signer), before={3: hiding})
    assert "data: " + _injected_payload().decode() in raw.decode().splitlines()
    with pytest.raises(VerificationError, match="comment"):
        verify_stream(raw, signer.public_key_b64)


# --- line endings, comments, fields ---------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_crlf_and_cr_only_streams_verify(signer: Signer, eol: bytes):
    raw = _sse(_payloads(signer), eol=eol)
    assert _our_events(raw) == _our_events(_sse(_payloads(signer)))
    verified = verify_stream(raw, signer.public_key_b64, request=REQUEST)
    assert verified.kind == "stream"


def test_comments_and_blank_lines_anywhere_verify(signer: Signer):
    raw = _sse(
        _payloads(signer),
        before={0: b": hello\n\n\n", 2: b": keep-alive\n", 4: b"\n\n: ping\n\n", 5: b":\n"},
    )
    raw += b": after the end\n\n"
    assert verify_stream(raw, signer.public_key_b64, request=REQUEST).kind == "stream"


@pytest.mark.parametrize("field", [b"event: message", b"id: 3", b"retry: 1000"])
def test_signed_event_with_an_extra_field_fails(signer: Signer, field: bytes):
    # The payloads are untouched, but clients route typed events elsewhere or keep their ids.
    raw = _sse(_payloads(signer), before={2: field + b"\n"})
    with pytest.raises(VerificationError, match="field"):
        verify_stream(raw, signer.public_key_b64)


@pytest.mark.parametrize("field", [b"event: x", b"id: 7", b"retry: 5"])
def test_event_without_data_but_with_a_field_fails(signer: Signer, field: bytes):
    # The openai SDK hands such an event on (and fails to parse its empty data).
    raw = _sse(_payloads(signer), before={2: field + b"\n\n"})
    assert ("x" if field == b"event: x" else None, "") in _sdk_events(raw)
    with pytest.raises(VerificationError, match="field"):
        verify_stream(raw, signer.public_key_b64)


@pytest.mark.parametrize("line", [b" data: x", b"Data: x", b"foo: bar", b"dat"])
def test_line_with_an_unknown_field_fails(signer: Signer, line: bytes):
    # Ignored by the specification, but a lenient parser that strips or folds case reads data.
    raw = _sse(_payloads(signer), before={2: line + b"\n"})
    with pytest.raises(VerificationError, match="field"):
        verify_stream(raw, signer.public_key_b64)


def test_event_with_two_data_lines_fails(signer: Signer):
    # Merging two signed events keeps the signed message (A + LF + B + LF) byte for byte, but a
    # client receives one event "A\nB" instead of two.
    raw = _sse(_payloads(signer)).replace(b"\n\ndata: ", b"\ndata: ", 1)
    assert len(_sdk_events(raw)) == len(_sdk_events(_sse(_payloads(signer)))) - 1
    with pytest.raises(VerificationError, match="2 data lines"):
        verify_stream(raw, signer.public_key_b64)


def test_event_with_empty_data_fails(signer: Signer):
    raw = _sse(_payloads(signer), before={2: b"data:\n\n"})
    with pytest.raises(VerificationError, match="not valid JSON"):
        verify_stream(raw, signer.public_key_b64)


@pytest.mark.parametrize(
    "after",
    [
        b"data: " + b'{"choices":[{"delta":{"content":"INJECTED"}}]}' + b"\n\n",
        b"data: [DONE]\n\n",
        b"event: x\ndata: y\n\n",
    ],
    ids=["payload", "second-done", "typed-event"],
)
def test_event_after_done_fails(signer: Signer, after: bytes):
    raw = _sse(_payloads(signer)) + after
    with pytest.raises(VerificationError):
        verify_stream(raw, signer.public_key_b64)


def test_signed_payload_replayed_after_done_fails(signer: Signer):
    payloads = _payloads(signer)
    raw = _sse(payloads) + b"data: " + payloads[2] + b"\n\n"
    with pytest.raises(VerificationError, match="after \\[DONE\\]"):
        verify_stream(raw, signer.public_key_b64)


def test_done_before_any_payload_fails(signer: Signer):
    raw = b"data: [DONE]\n\n" + _sse(_payloads(signer))
    with pytest.raises(VerificationError, match="no data events before"):
        verify_stream(raw, signer.public_key_b64)


def test_done_without_its_blank_line_verifies(signer: Signer):
    raw = _sse(_payloads(signer)).removesuffix(b"\n\n")
    assert verify_stream(raw, signer.public_key_b64).kind == "stream"


def test_stream_ending_inside_the_signed_event_fails(signer: Signer):
    # The specification drops an event that no blank line ends: clients would miss "!".
    raw = _sse(_payloads(signer), done=False).removesuffix(b"\n\n")
    assert len(_sdk_events(raw)) == len(_payloads(signer)) - 1
    with pytest.raises(VerificationError, match="no blank line after it"):
        verify_stream(raw, signer.public_key_b64)


def test_stream_ending_inside_an_event_after_done_fails(signer: Signer):
    raw = _sse(_payloads(signer)) + b"data: " + _injected_payload()
    with pytest.raises(VerificationError, match="no blank line after it"):
        verify_stream(raw, signer.public_key_b64)


def test_stream_with_invalid_utf8_fails(signer: Signer):
    raw = _sse(_payloads(signer), before={2: b": \xff\n"})
    with pytest.raises(VerificationError, match="UTF-8"):
        verify_stream(raw, signer.public_key_b64)


def test_byte_order_mark_before_a_comment_verifies(signer: Signer):
    raw = BOM + b": stream\n\n" + _sse(_payloads(signer))
    assert _our_events(raw) == _sdk_events(raw)
    assert verify_stream(raw, signer.public_key_b64).kind == "stream"


def test_byte_order_mark_before_a_data_line_fails(signer: Signer):
    # The specification drops the mark; the openai SDK keeps it and skips the first event.
    raw = BOM + _sse(_payloads(signer))
    assert len(_sdk_events(raw)) == len(_our_events(raw)) - 1
    with pytest.raises(VerificationError, match="byte-order mark"):
        verify_stream(raw, signer.public_key_b64)


def test_signed_payloads_are_the_data_of_each_event(signer: Signer):
    payloads = _payloads(signer)
    assert signed_payloads(_sse(payloads, eol=b"\r")) == payloads
    assert signed_payloads(_sse(payloads, done=False)) == payloads


# --- the parser is the client's parser ------------------------------------------------------

TRICKY_STREAMS = {
    "cr-then-crlf": b"data: a\r\rdata: b\r\n\r\ndata: c\n\n",
    "comment-then-cr": b": c\rdata: x\n\n",
    "event-then-cr": b"event: x\rdata: y\r\r",
    "spaces": b"data:no-space\n\ndata:  two spaces\n\n",
    "no-colon": b"data\n\n",
    "multi-line": b"data: a\ndata: b\n\n",
    "unknown-field": b"foo: bar\ndata: z\n\n",
    "last-event-wins": b"event: e1\nevent: e2\ndata: d\n\n",
    "empty-event-name": b"event:\ndata: e\n\n",
    "retry": b"retry: 10\ndata: r\n\n",
    "mixed-ends": b"data: 1\r\n\ndata: 2\n\r\ndata: 3\r\r\n",
    "utf8": "data: é ß 漢\r\r".encode(),
    "unterminated": b"data: kept\n\ndata: dropped",
    "id-last": b"data: x\n\nid: 1\ndata: i\n\n",
}


@pytest.mark.parametrize("raw", TRICKY_STREAMS.values(), ids=TRICKY_STREAMS.keys())
def test_parser_and_openai_sdk_agree_on_tricky_streams(raw: bytes):
    ours = _our_events(raw)
    assert ours == _sdk_events(raw)
    assert ours == _sdk_events(raw, byte_by_byte=True)


def test_parser_reads_a_genuine_stream_as_the_sdk_does(signer: Signer):
    for eol in (b"\n", b"\r\n", b"\r"):
        raw = _sse(_payloads(signer), eol=eol)
        assert _our_events(raw) == _sdk_events(raw, byte_by_byte=True)
        assert [data.encode() for _, data in _our_events(raw)[:-1]] == _payloads(signer)


def test_parser_drops_one_byte_order_mark():
    assert _our_events(BOM + b"data: x\n\n") == [(None, "x")]
    assert _our_events(BOM + BOM + b"data: x\n\n") == []


# --- duplicate keys and other ambiguous JSON ------------------------------------------------


def _response(signer: Signer) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "real"},
                "finish_reason": "stop",
            }
        ],
    }
    return sign_completion(body, signer, REQUEST_SHA)


@pytest.mark.parametrize(
    ("needle", "duplicated"),
    [
        (b'"content":"real"', b'"content":"INJECTED","content":"real"'),
        (b'"id":"chatcmpl-1"', b'"id":"other","id":"chatcmpl-1"'),
    ],
    ids=["nested", "top-level"],
)
def test_duplicate_json_keys_fail_in_response(signer: Signer, needle: bytes, duplicated: bytes):
    raw = _response(signer)
    assert verify_response(raw, signer.public_key_b64).kind == "response"
    tampered = raw.replace(needle, duplicated, 1)
    assert tampered != raw
    with pytest.raises(VerificationError, match="duplicate key"):
        verify_response(tampered, signer.public_key_b64)
    with pytest.raises(VerificationError, match="duplicate key"):
        verify_any(tampered, signer.public_key_b64)


def test_duplicate_json_keys_fail_in_stream(signer: Signer):
    # The last chunk is checked in canonical form, so without the check a duplicate whose
    # last value is the signed one would verify while a first-wins parser shows the other.
    payloads = _payloads(signer)
    payloads[-1] = payloads[-1].replace(b'"content":"!"', b'"content":"INJECTED","content":"!"')
    assert b"INJECTED" in payloads[-1]
    with pytest.raises(VerificationError, match="duplicate key"):
        verify_stream(_sse(payloads), signer.public_key_b64)


def test_duplicate_json_keys_fail_in_an_earlier_stream_payload(signer: Signer):
    payloads = _payloads(signer)
    payloads[1] = payloads[1].replace(b'"created":', b'"created":1,"created":', 1)
    with pytest.raises(VerificationError, match="event 2: not valid JSON: duplicate key"):
        verify_stream(_sse(payloads), signer.public_key_b64)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_constants_fail(signer: Signer, constant: bytes):
    raw = _response(signer).replace(b'"created":1700000000', b'"created":' + constant)
    with pytest.raises(VerificationError, match="not valid JSON"):
        verify_response(raw, signer.public_key_b64)


def test_lone_surrogate_fails_as_a_verification_error(signer: Signer):
    raw = _response(signer).replace(b'"content":"real"', b'"content":"\\ud800"')
    with pytest.raises(VerificationError, match="no canonical form"):
        verify_response(raw, signer.public_key_b64)


def test_response_with_a_byte_order_mark_verifies(signer: Signer):
    assert verify_response(BOM + _response(signer), signer.public_key_b64).kind == "response"


# --- verify_any ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    [b": keep-alive\n\n", BOM + b":\n", b"\r\n\n", BOM + b"\n"],
    ids=["comment", "bom-comment", "blank-lines", "bom-blank"],
)
def test_verify_any_reads_anything_but_a_json_object_as_a_stream(signer: Signer, prefix: bytes):
    raw = prefix + _sse(_payloads(signer))
    assert verify_any(raw, signer.public_key_b64, request=REQUEST).kind == "stream"


@pytest.mark.parametrize("first", [b"event: x\n", b"id: 1\n\n", b"foo: bar\n\n"])
def test_verify_any_names_the_field_of_a_stream_starting_with_another_field(
    signer: Signer, first: bytes
):
    raw = first + _sse(_payloads(signer))
    name = first.partition(b":")[0].decode()
    with pytest.raises(VerificationError, match=f"field '{name}'"):
        verify_any(raw, signer.public_key_b64)


def test_verify_any_reads_a_json_object_with_a_byte_order_mark_as_a_response(signer: Signer):
    raw = BOM + b" \n" + _response(signer)
    assert verify_any(raw, signer.public_key_b64, request=REQUEST).kind == "response"


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_a_last_event_without_its_blank_line_is_refused_as_the_sdk_drops_it(
    signer: Signer, end: bytes
):
    payloads = _payloads(signer)
    raw = _sse(payloads[:-1], eol=end, done=False) + b"data: " + payloads[-1] + end
    seen = [data for _, data in _sdk_events(raw)]
    assert len(seen) == len(payloads) - 1  # the openai SDK never shows the signed chunk
    with pytest.raises(VerificationError, match="no blank line"):
        verify_stream(raw, signer.public_key_b64)
