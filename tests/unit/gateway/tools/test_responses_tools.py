"""A whole response object sent as a stream of typed events: relayed, signed and verifiable."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nilai.auth.base import Principal
from nilai.crypto.keys import Signer
from nilai.crypto.verify import (
    VerificationError,
    responses_signed_payloads,
    verify_responses_stream,
)
from nilai.gateway.chat.context import RESPONSES_API, RequestContext
from nilai.gateway.chat.stream import ReadDeadline, read_batches, relay_events
from nilai.gateway.drain import Drain
from nilai.gateway.responses.signing import ResponseStreamSigner
from nilai.gateway.responses.stream import RESPONSES_FRAMING, ResponseEventForwarder
from nilai.gateway.tools.loop import ROUNDS_FIELD
from nilai.gateway.tools.responses import response_as_stream

REQUEST = b'{"model":"m","input":"hi","stream":true}'
USAGE = {"input_tokens": 10, "output_tokens": 20, "total_tokens": 30}
MESSAGE: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "status": "completed",
    "content": [
        {"type": "output_text", "text": "It is ", "annotations": []},
        {"type": "output_text", "text": "42.", "annotations": []},
    ],
}
WEATHER_CALL: dict[str, Any] = {
    "id": "fc_1",
    "type": "function_call",
    "call_id": "call_w",
    "name": "get_weather",
    "arguments": '{"city": "Paris"}',
    "status": "completed",
}


def _answer(*output: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "resp_7",
        "object": "response",
        "created_at": 1700000000,
        "model": "m",
        "status": "completed",
        "output": list(output),
        "usage": USAGE,
    }


@pytest.fixture
def ctx() -> RequestContext:
    return RequestContext.begin("req-1", Principal("acct", "api_key"), REQUEST, api=RESPONSES_API)


async def _client_stream(
    answer: dict[str, Any],
    signer: Signer,
    ctx: RequestContext,
    added: dict[str, object] | None = None,
) -> bytes:
    """What the client receives when ``answer`` is relayed as the model server's stream."""
    forwarder = ResponseEventForwarder(
        ResponseStreamSigner(signer, ctx.request_sha256, added=added), ctx
    )
    drain = Drain(10)
    batches = read_batches(response_as_stream(answer), ReadDeadline(5, 5, drain), drain)

    async def release() -> None:
        pass

    writes = relay_events(batches, forwarder, ctx, release=release, framing=RESPONSES_FRAMING)
    return b"".join([w async for w in writes])


def _events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(payload) for payload in responses_signed_payloads(raw)]


async def test_a_message_streams_as_text_deltas_and_ends_with_a_signed_completed(
    signer: Signer, ctx: RequestContext
):
    answer = _answer(MESSAGE)
    raw = await _client_stream(answer, signer, ctx)
    events = _events(raw)
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.completed") == 1
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == (
        "It is 42."
    )
    assert [e["text"] for e in events if e["type"] == "response.output_text.done"] == [
        "It is ",
        "42.",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["output"] == []
    assert events[0]["response"]["status"] == "in_progress"
    completed = events[-1]["response"]
    assert completed["output"] == [MESSAGE]
    assert completed["usage"] == USAGE
    verified = verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)
    assert verified.request_sha256 == ctx.request_sha256
    assert (ctx.status, ctx.prompt_tokens, ctx.completion_tokens) == (200, 10, 20)


async def test_a_function_call_streams_its_arguments(signer: Signer, ctx: RequestContext):
    raw = await _client_stream(_answer(WEATHER_CALL), signer, ctx)
    events = _events(raw)
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["item"]["type"] for e in added] == ["function_call"]
    assert added[0]["item"]["arguments"] == ""
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert "".join(e["delta"] for e in deltas) == WEATHER_CALL["arguments"]
    assert [e["arguments"] for e in done] == [WEATHER_CALL["arguments"]]
    assert {e["item_id"] for e in deltas + done} == {"fc_1"}
    item_done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["item"] for e in item_done] == [WEATHER_CALL]
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"] == [WEATHER_CALL]
    verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)


async def test_the_earlier_calls_and_the_rounds_are_in_the_signed_completed(
    signer: Signer, ctx: RequestContext
):
    ctx.count_earlier_call(100, 50)  # a tool round's call
    rounds = [{"output": [], "results": [{"call_id": "call_1", "output": "42\n"}]}]
    raw = await _client_stream(_answer(MESSAGE), signer, ctx, added={ROUNDS_FIELD: rounds})
    last = _events(raw)[-1]
    assert last["type"] == "response.completed"
    assert last["response"]["usage"] == {
        "input_tokens": 110,
        "output_tokens": 70,
        "total_tokens": 180,
    }
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (110, 70)
    # Inside the response object, where the answer's data is (as ``sources``).
    assert last["response"][ROUNDS_FIELD] == rounds
    assert ROUNDS_FIELD not in last
    verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)
    with pytest.raises(VerificationError):
        verify_responses_stream(raw.replace(b'"42\\n"', b'"43\\n"'), signer.public_key_b64)


async def test_other_items_stream_whole(signer: Signer, ctx: RequestContext):
    reasoning: dict[str, Any] = {"id": "rs_1", "type": "reasoning", "summary": []}
    raw = await _client_stream(_answer(reasoning, MESSAGE), signer, ctx)
    events = _events(raw)
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [
        (0, "reasoning"),
        (1, "message"),
    ]
    assert added[0]["item"] == reasoning
    verify_responses_stream(raw, signer.public_key_b64, request=REQUEST)
