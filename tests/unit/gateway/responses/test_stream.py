"""Relaying a Responses API stream: typed events, checked, the completed event signed last."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import orjson
import pytest
from coincurve import PrivateKey

from nilai.auth.base import Principal
from nilai.crypto.keys import Signer
from nilai.crypto.verify import VerificationError, verify_responses_stream
from nilai.errors import UpstreamProtocolError
from nilai.gateway.chat.context import RESPONSES_API, RequestContext
from nilai.gateway.chat.stream import relay_events
from nilai.gateway.responses.signing import ResponseStreamSigner
from nilai.gateway.responses.stream import (
    RESPONSES_FRAMING,
    ResponseEventForwarder,
    error_event,
    typed_event,
)

REQUEST = b'{"model":"m","input":"hi","stream":true}'
USAGE = {"input_tokens": 11, "output_tokens": 3, "total_tokens": 14}
FORGED_SOURCES = [{"source": "https://evil.example", "content": "made up"}]
OUR_SOURCES = [{"source": "https://example.com/a", "content": "the page's text"}]


def _event(kind: str, **fields: Any) -> bytes:
    """An upstream payload as the fake model server writes it: compact, ``type`` first."""
    return orjson.dumps({"type": kind, **fields})


def _response(status: str, **fields: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "model": "m", "status": status, **fields}


CREATED = _event("response.created", sequence_number=0, response=_response("in_progress"))
ADDED = _event(
    "response.output_item.added",
    sequence_number=1,
    output_index=0,
    item={"id": "msg_1", "type": "message", "role": "assistant", "content": []},
)
HEL = _event("response.output_text.delta", sequence_number=2, item_id="msg_1", delta="Hel")
LO = _event("response.output_text.delta", sequence_number=3, item_id="msg_1", delta="lo \u00e9")
TEXT_DONE = _event("response.output_text.done", sequence_number=4, item_id="msg_1", text="Hello")
OUTPUT = [
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Hello é"}],
    }
]
COMPLETED = _event(
    "response.completed",
    sequence_number=5,
    response=_response("completed", output=OUTPUT, usage=USAGE),
)
BEFORE_COMPLETED = [CREATED, ADDED, HEL, LO, TEXT_DONE]
UPSTREAM = [*BEFORE_COMPLETED, COMPLETED]


@pytest.fixture
def ctx() -> RequestContext:
    return RequestContext.begin("req-1", Principal("acct", "api_key"), REQUEST, api=RESPONSES_API)


async def _batches(*batches: list[bytes]) -> AsyncGenerator[list[bytes]]:
    """The upstream's payloads, each list what one read completed."""
    for batch in batches:
        yield batch


async def _relay(
    signer: Signer,
    ctx: RequestContext,
    *batches: list[bytes],
    added: dict[str, object] | None = None,
) -> list[bytes | str]:
    """Every write the relay makes, with ``"released"`` where the release ran."""
    writes: list[bytes | str] = []

    async def release() -> None:
        writes.append("released")

    forwarder = ResponseEventForwarder(
        ResponseStreamSigner(signer, ctx.request_sha256, added=added), ctx
    )
    relayed = relay_events(
        _batches(*batches), forwarder, ctx, release=release, framing=RESPONSES_FRAMING
    )
    async for write in relayed:
        writes.append(write)  # noqa: PERF401 - the release must land between the writes
    return writes


def _raw(writes: list[bytes | str]) -> bytes:
    return b"".join(write for write in writes if isinstance(write, bytes))


def _events(raw: bytes) -> list[tuple[str, bytes]]:
    """Each event's name and data, checking every event is exactly those two lines."""
    assert raw.endswith(b"\n\n")
    events: list[tuple[str, bytes]] = []
    for block in raw.removesuffix(b"\n\n").split(b"\n\n"):
        name_line, data_line = block.split(b"\n")
        assert name_line.startswith(b"event: ")
        assert data_line.startswith(b"data: ")
        events.append((name_line.removeprefix(b"event: ").decode(), data_line[len(b"data: ") :]))
    return events


def _last(raw: bytes) -> dict[str, Any]:
    return json.loads(_events(raw)[-1][1])


# --- a stream that completes ------------------------------------------------------------------


async def test_every_event_is_relayed_unchanged_in_order_and_completed_comes_signed_last(
    signer: Signer, ctx: RequestContext
):
    writes = await _relay(signer, ctx, [CREATED, ADDED], [HEL], [LO, TEXT_DONE], [COMPLETED])
    # One write per upstream read; the completed event is held back to the last write, which
    # comes after the release.
    assert writes[:3] == [
        typed_event(CREATED) + typed_event(ADDED),
        typed_event(HEL),
        typed_event(LO) + typed_event(TEXT_DONE),
    ]
    assert writes[3] == "released"
    assert len(writes) == 5
    raw = _raw(writes)
    events = _events(raw)
    assert [data for _, data in events[:-1]] == BEFORE_COMPLETED
    for name, data in events:
        assert name == json.loads(data)["type"]
    assert [name for name, _ in events] == [
        "response.created",
        "response.output_item.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.completed",
    ]
    last = _last(raw)
    assert last["type"] == "response.completed"
    assert last["request_sha256"] == ctx.request_sha256
    assert isinstance(last["signature"], str)
    assert last["response"] == json.loads(COMPLETED)["response"]
    assert last["sequence_number"] == 5
    assert b"[DONE]" not in raw
    assert b"event: error" not in raw
    verified = verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)
    assert (verified.kind, verified.request_sha256) == ("responses stream", ctx.request_sha256)
    assert (ctx.status, ctx.error_kind) == (200, None)


async def test_a_changed_byte_or_an_injected_event_fails_verification(
    signer: Signer, ctx: RequestContext
):
    raw = _raw(await _relay(signer, ctx, UPSTREAM))
    verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)
    assert raw.count(b'"delta":"Hel"') == 1
    with pytest.raises(VerificationError):
        verify_responses_stream(
            raw.replace(b'"delta":"Hel"', b'"delta":"Hal"'), signer.public_key_b64
        )
    injected = _event("response.output_text.delta", sequence_number=4, delta="!")
    completed_at = raw.index(b"event: response.completed")
    forged = raw[:completed_at] + typed_event(injected) + raw[completed_at:]
    with pytest.raises(VerificationError):
        verify_responses_stream(forged, signer.public_key_b64)
    with pytest.raises(VerificationError):  # another gateway's key
        verify_responses_stream(raw, Signer(PrivateKey()).public_key_b64)


@pytest.mark.parametrize(
    "upstream",
    [
        b'{"sequence_number":2,"delta":"Hel","type":"response.output_text.delta"}',
        b'{"type": "response.output_text.delta", "sequence_number": 2, "delta": "Hel"}',
        b'{\n  "type": "response.output_text.delta",\n  "sequence_number": 2,\n  "delta": "Hel"\n}',
        b'{"type":"response.output_text.delta",\n"sequence_number":2,"delta":"Hel"}',
        b'{"type":"response.output_text.delta",\r"sequence_number":2,"delta":"Hel"}',
    ],
    ids=["type-last", "spaces", "pretty", "newline", "carriage-return"],
)
async def test_payloads_not_compact_and_type_first_are_re_encoded_so(
    signer: Signer, ctx: RequestContext, upstream: bytes
):
    raw = _raw(await _relay(signer, ctx, [CREATED, upstream, COMPLETED]))
    events = _events(raw)
    assert events[1] == (
        "response.output_text.delta",
        b'{"type":"response.output_text.delta","sequence_number":2,"delta":"Hel"}',
    )
    assert verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)


async def test_a_compact_type_first_payload_passes_byte_for_byte(
    signer: Signer, ctx: RequestContext
):
    # Key order upstream chose, non-ASCII text as raw UTF-8: nothing for the gateway to change.
    upstream = b'{"type":"response.output_text.delta","delta":"\xc3\xa9","z":1,"a":[1,{"b":2}]}'
    raw = _raw(await _relay(signer, ctx, [upstream, COMPLETED]))
    assert _events(raw)[0] == ("response.output_text.delta", upstream)
    assert verify_responses_stream(raw, signer.public_key_b64)


async def test_line_separators_in_event_text_are_escaped_and_the_stream_still_verifies(
    signer: Signer, ctx: RequestContext
):
    text = "a\u2028b\u2029c\u0085d"
    upstream = _event("response.output_text.delta", delta=text)
    raw = _raw(await _relay(signer, ctx, [upstream, COMPLETED]))
    assert all(sep not in raw for sep in (b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9"))
    assert json.loads(_events(raw)[0][1])["delta"] == text
    assert verify_responses_stream(raw, signer.public_key_b64)


# --- usage ------------------------------------------------------------------------------------


async def test_usage_comes_from_the_completed_response(signer: Signer, ctx: RequestContext):
    assert ctx.usage_names == ("input_tokens", "output_tokens")
    raw = _raw(await _relay(signer, ctx, UPSTREAM))
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (11, 3)  # not the 2 deltas
    assert ctx.usage_reported
    assert _last(raw)["response"]["usage"] == USAGE


async def test_the_planners_tokens_are_in_the_relayed_usage_and_the_context(
    signer: Signer, ctx: RequestContext
):
    ctx.count_earlier_call(5, 2)
    raw = _raw(await _relay(signer, ctx, UPSTREAM))
    assert _last(raw)["response"]["usage"] == {
        "input_tokens": 16,
        "output_tokens": 5,
        "total_tokens": 21,
    }
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (16, 5)
    assert verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)


async def test_output_text_deltas_count_one_token_each_when_the_stream_is_cut(
    signer: Signer, ctx: RequestContext
):
    arguments = _event("response.function_call_arguments.delta", delta='{"a"')
    reasoning = _event("response.reasoning_text.delta", delta="hmm")
    cut = [CREATED, ADDED, HEL, arguments, reasoning, LO, HEL]
    raw = _raw(await _relay(signer, ctx, cut))
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (0, 3)  # output_text deltas only
    assert not ctx.usage_reported
    assert b"signature" not in raw
    assert (ctx.status, ctx.error_kind) == (502, "UpstreamProtocolError")


def test_the_first_delta_event_marks_the_first_token(signer: Signer, ctx: RequestContext):
    forwarder = ResponseEventForwarder(ResponseStreamSigner(signer, ctx.request_sha256), ctx)
    assert forwarder.feed(CREATED) == [CREATED]
    assert forwarder.feed(ADDED) == [ADDED]
    assert ctx.first_token_s is None
    forwarder.feed(_event("response.function_call_arguments.delta", delta="{"))
    first = ctx.first_token_s
    assert first is not None
    assert first >= 0
    forwarder.feed(HEL)
    assert ctx.first_token_s == first  # the first one wins


# --- the gateway's own fields -------------------------------------------------------------------


async def test_gateway_fields_from_the_model_server_are_dropped_everywhere(
    signer: Signer, ctx: RequestContext
):
    forged = {"sources": FORGED_SOURCES, "signature": "forged", "request_sha256": "ab" * 32}
    created = _event("response.created", response=_response("in_progress", **forged), **forged)
    delta = _event("response.output_text.delta", delta="Hel", **forged)
    completed = _event(
        "response.completed", response=_response("completed", usage=USAGE, **forged), **forged
    )
    raw = _raw(await _relay(signer, ctx, [created, delta, completed]))
    events = [json.loads(data) for _, data in _events(raw)]
    assert events[0] == {"type": "response.created", "response": _response("in_progress")}
    assert events[1] == {"type": "response.output_text.delta", "delta": "Hel"}
    last = events[2]
    assert last["response"] == _response("completed", usage=USAGE)
    assert "sources" not in last
    assert last["request_sha256"] == ctx.request_sha256  # the gateway's, not the forged one
    assert last["signature"] != "forged"
    assert b"evil.example" not in raw
    assert verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)


async def test_the_signers_sources_go_inside_the_completed_response_and_are_signed(
    signer: Signer, ctx: RequestContext
):
    forged_completed = _event(
        "response.completed",
        response=_response("completed", usage=USAGE, sources=FORGED_SOURCES),
    )
    raw = _raw(
        await _relay(signer, ctx, [CREATED, HEL, forged_completed], added={"sources": OUR_SOURCES})
    )
    last = _last(raw)
    assert last["response"]["sources"] == OUR_SOURCES
    assert "sources" not in last
    assert all("sources" not in json.loads(data) for _, data in _events(raw)[:-1])
    verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)
    assert raw.count(b"the page's text") == 1
    with pytest.raises(VerificationError):
        verify_responses_stream(
            raw.replace(b"the page's text", b"the page's test"), signer.public_key_b64
        )


# --- streams that cannot be completed --------------------------------------------------------

COMPLETED_LIKE = _response("completed", usage=USAGE)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([b'{"type":"response.output_text.delta","delta":'], "malformed stream event"),
        ([b"not json"], "malformed stream event"),
        ([b"[1, 2]"], "unexpected stream event"),
        ([b'"response.completed"'], "unexpected stream event"),
        ([b"null"], "unexpected stream event"),
        ([b'{"delta":"x"}'], "no Responses API type"),
        ([b'{"type":7,"delta":"x"}'], "no Responses API type"),
        ([b'{"type":"message.delta","delta":"x"}'], "no Responses API type"),
        ([b'{"type":"response.Output_text.delta"}'], "no Responses API type"),
        ([b'{"type":"response."}'], "no Responses API type"),
        ([b'{"type":"response.output text"}'], "no Responses API type"),
        ([b'{"type":"error","code":"x","message":"boom","param":null}'], "error mid-stream"),
        ([b'{"error":{"message":"boom"}}'], "error mid-stream"),
        ([_event("response.failed", response=_response("failed"))], "response failed"),
        ([_event("response.incomplete", response=_response("incomplete"))], "incomplete"),
        ([COMPLETED, HEL], "after response.completed"),
        ([COMPLETED, COMPLETED], "after response.completed"),
        ([], "without response.completed"),
    ],
    ids=[
        "truncated-json",
        "not-json",
        "array",
        "string",
        "null",
        "no-type",
        "type-not-a-string",
        "type-not-response",
        "type-upper-case",
        "type-empty-name",
        "type-with-space",
        "type-error",
        "error-field",
        "response-failed",
        "response-incomplete",
        "event-after-completed",
        "completed-twice",
        "ends-without-completed",
    ],
)
async def test_a_stream_that_cannot_complete_ends_with_one_unsigned_error_event(
    signer: Signer, ctx: RequestContext, bad: list[bytes], message: str
):
    # What follows the bad event, in its read and in the next one, is never sent.
    after = [[*bad, LO], [LO]] if bad else []
    writes = await _relay(signer, ctx, [CREATED, HEL], *after)
    assert writes[0] == typed_event(CREATED) + typed_event(HEL)
    assert writes[1] == "released"
    final = writes[2]
    assert isinstance(final, bytes)
    assert len(writes) == 3
    assert b"\nevent: " not in final  # nothing else in the last write: what followed is dropped
    raw = _raw(writes)
    assert raw.count(b"event: error") == 1
    assert b"signature" not in raw
    assert b"request_sha256" not in raw
    assert b"event: response.completed" not in raw
    assert b"[DONE]" not in raw
    assert final.startswith(b"event: error\ndata: ")
    assert final.endswith(b"\n\n")
    error = json.loads(final.removeprefix(b"event: error\ndata: "))
    assert list(error) == ["type", "code", "message", "param"]
    assert (error["type"], error["code"], error["param"]) == ("error", "bad_gateway", None)
    assert message in error["message"]
    assert (ctx.status, ctx.error_kind) == (502, "UpstreamProtocolError")
    with pytest.raises(VerificationError):
        verify_responses_stream(raw, signer.public_key_b64)


async def test_an_error_as_the_first_event_sends_only_the_error(
    signer: Signer, ctx: RequestContext
):
    writes = await _relay(signer, ctx, [b'{"type":"error","code":"server_error","message":"m"}'])
    assert writes == [
        "released",
        error_event(UpstreamProtocolError("The model server reported an error mid-stream.")),
    ]
    assert ctx.first_token_s is None
    assert ctx.status == 502


async def test_a_duplicated_type_key_is_never_relayed_as_is(signer: Signer, ctx: RequestContext):
    """JSON readers disagree on which of two equal keys wins, and the verifier refuses them.

    The forwarder reads the last ``type`` while the event is named after the first one; the
    gateway must not sign a stream that its own verifier rejects (re-encode it, or refuse it).
    """
    twice = b'{"type":"response.output_text.delta","delta":"x","type":"response.created"}'
    raw = _raw(await _relay(signer, ctx, [CREATED, twice, COMPLETED]))
    if b"event: error" in raw:
        assert ctx.status == 502
        return
    verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)


# --- the framing --------------------------------------------------------------------------------


def test_typed_event_names_the_event_after_its_data_type():
    payload = b'{"type":"response.output_text.delta","delta":"type"}'
    assert typed_event(payload) == (
        b"event: response.output_text.delta\ndata: " + payload + b"\n\n"
    )


def test_error_event_is_openais_error_event():
    error = UpstreamProtocolError("The model server broke the stream.")
    assert error_event(error) == (
        b'event: error\ndata: {"type":"error","code":"bad_gateway",'
        b'"message":"The model server broke the stream.","param":null}\n\n'
    )


def test_the_responses_framing_sends_no_done():
    assert RESPONSES_FRAMING.end == b""
    assert RESPONSES_FRAMING.event is typed_event
    assert RESPONSES_FRAMING.error is error_event
