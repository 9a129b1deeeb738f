"""Server tools through ChatService and ResponsesService, against a scripted model server.

The model server's first answer calls ``execute_python``; the gateway runs it (a
``RecordingExecutor``, never a sandbox), sends the result back, and the second answer is the
client's: signed, showing the round, and charging exactly the sum of both calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from nilai.auth.base import Principal
from nilai.crypto.keys import Signer
from nilai.crypto.verify import (
    responses_signed_payloads,
    sse_payloads,
    verify_response,
    verify_responses_object,
    verify_responses_stream,
    verify_stream,
)
from nilai.discovery.base import EndpointRecord
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.gateway.chat.context import RESPONSES_API, RequestContext
from nilai.gateway.chat.service import ChatService
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import Metrics
from nilai.gateway.pipeline import ModelPipeline
from nilai.gateway.responses.service import ResponsesService
from nilai.gateway.tools.loop import ROUNDS_FIELD
from nilai.limits.memory import MemoryConcurrencyLimiter, MemoryRateLimiter
from nilai.limits.policy import Admission, LimitDefaults
from nilai.protocol.chat import ChatCompletionRequest
from nilai.protocol.models import ModelCard
from nilai.protocol.responses import ResponsesRequest
from nilai.store.base import QueryLog
from nilai.tools.executor import Execution, RecordingExecutor
from nilai.tools.server import EXECUTE_PYTHON, ServerTools
from nilai.upstream.client import HttpxUpstream
from nilai.upstream.sse import DONE, frame
from tests.support.records import ListSink

CARD = ModelCard(id="m", tool_support=True, supported_features=["chat_completion", "responses"])
CODE = "print(6*7)"
ARGUMENTS = json.dumps({"code": CODE})
ANSWER_TEXT = "6*7 is 42."

Reply = Callable[[], httpx.Response]


@dataclass
class Outcome:
    """What one request through a service did."""

    body: bytes
    raw_request: bytes
    sent: list[dict[str, Any]]
    """The payload of every request the model server got, in order."""
    logs: list[QueryLog]
    executor: RecordingExecutor


def _executor() -> RecordingExecutor:
    return RecordingExecutor(answers={CODE: Execution("42\n", "", 0)})


async def _serve(
    signer: Signer,
    replies: list[Reply],
    body: dict[str, Any],
    *,
    responses: bool = False,
    tools: bool = True,
    max_rounds: int = 1,
) -> Outcome:
    """Send ``body`` once through a service whose model server gives ``replies`` in order."""
    raw_request = json.dumps(body).encode()
    discovery = MemoryDiscovery()
    await discovery.register(
        EndpointRecord(url="http://model-a", models=(CARD,), registered_at=1.0), 10
    )
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        assert len(sent) <= len(replies), "more model calls than scripted"
        return replies[len(sent) - 1]()

    executor = _executor()
    server_tools = ServerTools(executor, [EXECUTE_PYTHON], max_calls_per_round=4)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        snapshot = DiscoverySnapshot(discovery, http, refresh_s=60, eject_s=1)
        await snapshot.refresh()
        sink = ListSink()
        rate = MemoryRateLimiter()
        admission = Admission(
            rate, MemoryConcurrencyLimiter(rate), LimitDefaults(), fail_open=False
        )
        kind: type[ModelPipeline] = ResponsesService if responses else ChatService
        service = kind(
            HttpxUpstream(http),
            snapshot,
            signer,
            sink,  # type: ignore[arg-type]
            admission,
            metrics=Metrics(),
            drain=Drain(10),
            request_timeout_s=5,
            tools=server_tools if tools else None,
            tool_max_rounds=max_rounds,
        )
        api = RESPONSES_API if responses else "chat"
        ctx = RequestContext.begin("r", Principal("acct", "api_key"), raw_request, api=api)
        stream = bool(body.get("stream"))
        if isinstance(service, ResponsesService):
            request = ResponsesRequest.model_validate_json(raw_request)
            if stream:
                events = await service.stream(request, ctx)
                out = b"".join([part async for part in events.events])
                await events.aclose()
            else:
                out = (await service.create(request, ctx)).body
        else:
            assert isinstance(service, ChatService)
            chat = ChatCompletionRequest.model_validate_json(raw_request)
            if stream:
                events = await service.stream(chat, ctx)
                out = b"".join([part async for part in events.events])
                await events.aclose()
            else:
                out = (await service.complete(chat, ctx)).body
    return Outcome(out, raw_request, sent, list(sink.logs), executor)


def _json(payload: dict[str, Any]) -> Reply:
    return lambda: httpx.Response(
        200, content=orjson.dumps(payload), headers={"content-type": "application/json"}
    )


def _sse(events: bytes) -> Reply:
    # Served unread, as a real streaming response is; the relay reads it raw.
    return lambda: httpx.Response(
        200, stream=httpx.ByteStream(events), headers={"content-type": "text/event-stream"}
    )


def _only_log(outcome: Outcome) -> QueryLog:
    assert len(outcome.logs) == 1
    return outcome.logs[0]


# --- chat completions -----------------------------------------------------------------------

EXECUTE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": EXECUTE_PYTHON, "parameters": {}},
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {}},
}
CHAT_BODY: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "What is 6*7?"}],
    "tools": [EXECUTE_TOOL],
}
CHAT_CALL: dict[str, Any] = {
    "id": "call_1",
    "type": "function",
    "function": {"name": EXECUTE_PYTHON, "arguments": ARGUMENTS},
}


def _completion(message: dict[str, Any], finish: str, prompt: int, completion: int):
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


CALLS_EXECUTE = _completion(
    {"role": "assistant", "content": None, "tool_calls": [CHAT_CALL]}, "tool_calls", 100, 50
)
ANSWERS = _completion({"role": "assistant", "content": ANSWER_TEXT}, "stop", 10, 20)
CHAT_ROUND = {
    "message": {"role": "assistant", "content": None, "tool_calls": [CHAT_CALL]},
    "results": [{"tool_call_id": "call_1", "name": EXECUTE_PYTHON, "content": "42\n"}],
}
SUMMED = {"prompt_tokens": 110, "completion_tokens": 70, "total_tokens": 180}


def _chat_stream_events() -> bytes:
    identity = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "model": "m"}
    chunks: list[dict[str, Any]] = [
        {**identity, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**identity, "choices": [{"index": 0, "delta": {"content": "6*7 is "}}]},
        {**identity, "choices": [{"index": 0, "delta": {"content": "42."}}]},
        {**identity, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {
            **identity,
            "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        },
    ]
    return b"".join(frame(orjson.dumps(chunk)) for chunk in chunks) + frame(DONE)


def _assert_second_chat_call_carries_the_round(outcome: Outcome) -> None:
    first, second = outcome.sent
    assert first["stream"] is False
    assert first["messages"] == CHAT_BODY["messages"]
    assert second["messages"] == [
        *CHAT_BODY["messages"],
        {"role": "assistant", "content": None, "tool_calls": [CHAT_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42\n"},
    ]
    assert second["tool_choice"] == "none"
    assert outcome.executor.calls == [CODE]


async def test_chat_runs_the_tool_and_signs_the_answer_with_its_round_and_summed_usage(
    signer: Signer,
):
    outcome = await _serve(signer, [_json(CALLS_EXECUTE), _json(ANSWERS)], CHAT_BODY)
    _assert_second_chat_call_carries_the_round(outcome)
    assert outcome.sent[1].get("stream", False) is False
    verify_response(outcome.body, signer.public_key_b64, request=outcome.raw_request)
    body = json.loads(outcome.body)
    assert body["choices"][0]["message"]["content"] == ANSWER_TEXT
    assert body[ROUNDS_FIELD] == [CHAT_ROUND]
    assert body["usage"] == SUMMED
    log = _only_log(outcome)
    assert (log.status_code, log.tool_calls, log.tools) == (200, 1, True)
    assert (log.prompt_tokens, log.completion_tokens) == (110, 70)


async def test_a_plain_chat_reports_exactly_its_own_usage(signer: Signer):
    plain = _completion({"role": "assistant", "content": "hi"}, "stop", 100, 50)
    body_in = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    outcome = await _serve(signer, [_json(plain)], body_in)
    body = json.loads(outcome.body)
    assert body["usage"] == {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
    assert ROUNDS_FIELD not in body
    log = _only_log(outcome)
    assert (log.prompt_tokens, log.completion_tokens, log.tool_calls) == (100, 50, 0)


async def test_chat_stream_runs_the_round_then_streams_the_signed_answer(signer: Signer):
    body_in = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    outcome = await _serve(signer, [_json(CALLS_EXECUTE), _sse(_chat_stream_events())], body_in)
    _assert_second_chat_call_carries_the_round(outcome)
    assert outcome.sent[1]["stream"] is True
    assert "stream_options" not in outcome.sent[0]
    verify_stream(outcome.body, signer.public_key_b64, request=outcome.raw_request)
    chunks = [json.loads(payload) for payload in sse_payloads(outcome.body)]
    text = "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )
    assert text == ANSWER_TEXT
    last = chunks[-1]
    assert last[ROUNDS_FIELD] == [CHAT_ROUND]
    assert last["usage"] == SUMMED
    assert all(ROUNDS_FIELD not in chunk for chunk in chunks[:-1])
    log = _only_log(outcome)
    assert (log.streamed, log.tool_calls) == (True, 1)
    assert (log.prompt_tokens, log.completion_tokens) == (110, 70)


async def test_chat_stream_whose_round_gave_the_answer_streams_that_answer(signer: Signer):
    body_in = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    outcome = await _serve(signer, [_json(CALLS_EXECUTE), _json(ANSWERS)], body_in, max_rounds=2)
    assert [sent["stream"] for sent in outcome.sent] == [False, False]
    assert "tool_choice" not in outcome.sent[1]
    verify_stream(outcome.body, signer.public_key_b64, request=outcome.raw_request)
    chunks = [json.loads(payload) for payload in sse_payloads(outcome.body)]
    text = "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )
    assert text == ANSWER_TEXT
    assert chunks[-1][ROUNDS_FIELD] == [CHAT_ROUND]
    assert chunks[-1]["usage"] == SUMMED
    log = _only_log(outcome)
    assert (log.prompt_tokens, log.completion_tokens, log.tool_calls) == (110, 70, 1)


async def test_chat_that_does_not_declare_the_tool_gets_the_call_unrun(signer: Signer):
    body_in = {**CHAT_BODY, "tools": [WEATHER_TOOL]}
    outcome = await _serve(signer, [_json(CALLS_EXECUTE)], body_in)
    assert outcome.executor.calls == []
    assert len(outcome.sent) == 1
    body = json.loads(outcome.body)
    assert body["choices"][0]["message"]["tool_calls"] == [CHAT_CALL]
    assert ROUNDS_FIELD not in body
    assert _only_log(outcome).tool_calls == 0


async def test_chat_with_tools_off_runs_nothing(signer: Signer):
    outcome = await _serve(signer, [_json(CALLS_EXECUTE)], CHAT_BODY, tools=False)
    assert outcome.executor.calls == []
    assert len(outcome.sent) == 1
    body = json.loads(outcome.body)
    assert body["choices"][0]["message"]["tool_calls"] == [CHAT_CALL]
    assert body["usage"] == {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
    assert _only_log(outcome).tool_calls == 0


# --- the Responses API ----------------------------------------------------------------------

RESPONSES_BODY: dict[str, Any] = {
    "model": "m",
    "input": "What is 6*7?",
    "tools": [{"type": "function", "name": EXECUTE_PYTHON, "parameters": {}}],
}
FUNCTION_CALL: dict[str, Any] = {
    "id": "fc_1",
    "type": "function_call",
    "call_id": "call_1",
    "name": EXECUTE_PYTHON,
    "arguments": ARGUMENTS,
    "status": "completed",
}
MESSAGE: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": ANSWER_TEXT, "annotations": []}],
}


def _response(output: dict[str, Any], given: int, made: int) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1700000000,
        "model": "m",
        "status": "completed",
        "output": [output],
        "usage": {"input_tokens": given, "output_tokens": made, "total_tokens": given + made},
    }


RESPONSE_CALLS = _response(FUNCTION_CALL, 100, 50)
RESPONSE_ANSWERS = _response(MESSAGE, 10, 20)
RESPONSES_ROUND = {
    "output": [FUNCTION_CALL],
    "results": [{"call_id": "call_1", "name": EXECUTE_PYTHON, "output": "42\n"}],
}
RESPONSES_SUMMED = {"input_tokens": 110, "output_tokens": 70, "total_tokens": 180}


def _typed(kind: str, **fields: Any) -> bytes:
    data = orjson.dumps({"type": kind, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def _responses_stream_events() -> bytes:
    pending: dict[str, Any] = {
        **RESPONSE_ANSWERS,
        "status": "in_progress",
        "output": [],
        "usage": None,
    }
    return b"".join(
        [
            _typed("response.created", sequence_number=0, response=pending),
            _typed("response.output_text.delta", sequence_number=1, item_id="msg_1", delta="6*7 "),
            _typed(
                "response.output_text.delta", sequence_number=2, item_id="msg_1", delta="is 42."
            ),
            _typed("response.completed", sequence_number=3, response=RESPONSE_ANSWERS),
        ]
    )


def _assert_second_responses_call_carries_the_round(outcome: Outcome) -> None:
    first, second = outcome.sent
    assert first["stream"] is False
    assert second["input"] == [
        {"role": "user", "content": "What is 6*7?"},
        FUNCTION_CALL,
        {"type": "function_call_output", "call_id": "call_1", "output": "42\n"},
    ]
    assert second["tool_choice"] == "none"
    assert outcome.executor.calls == [CODE]


async def test_responses_runs_the_tool_and_signs_the_answer_with_its_round_and_summed_usage(
    signer: Signer,
):
    outcome = await _serve(
        signer, [_json(RESPONSE_CALLS), _json(RESPONSE_ANSWERS)], RESPONSES_BODY, responses=True
    )
    _assert_second_responses_call_carries_the_round(outcome)
    verify_responses_object(outcome.body, signer.public_key_b64, request=outcome.raw_request)
    body = json.loads(outcome.body)
    assert body["output"] == [MESSAGE]
    assert body[ROUNDS_FIELD] == [RESPONSES_ROUND]
    assert body["usage"] == RESPONSES_SUMMED
    log = _only_log(outcome)
    assert (log.status_code, log.tool_calls, log.tools) == (200, 1, True)
    assert (log.prompt_tokens, log.completion_tokens) == (110, 70)


async def test_a_plain_response_reports_exactly_its_own_usage(signer: Signer):
    outcome = await _serve(
        signer,
        [_json(RESPONSE_CALLS)],
        {"model": "m", "input": "hi"},
        responses=True,
    )
    body = json.loads(outcome.body)
    assert body["usage"] == {"input_tokens": 100, "output_tokens": 50, "total_tokens": 150}
    assert outcome.executor.calls == []
    log = _only_log(outcome)
    assert (log.prompt_tokens, log.completion_tokens, log.tool_calls) == (100, 50, 0)


async def test_responses_stream_runs_the_round_then_streams_the_signed_answer(signer: Signer):
    body_in = {**RESPONSES_BODY, "stream": True}
    outcome = await _serve(
        signer,
        [_json(RESPONSE_CALLS), _sse(_responses_stream_events())],
        body_in,
        responses=True,
    )
    _assert_second_responses_call_carries_the_round(outcome)
    assert outcome.sent[1]["stream"] is True
    verify_responses_stream(outcome.body, signer.public_key_b64, request=outcome.raw_request)
    events = [json.loads(p) for p in responses_signed_payloads(outcome.body)]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == ANSWER_TEXT
    last = events[-1]
    assert last["type"] == "response.completed"
    assert last["response"][ROUNDS_FIELD] == [RESPONSES_ROUND]
    assert last["response"]["usage"] == RESPONSES_SUMMED
    log = _only_log(outcome)
    assert (log.streamed, log.tool_calls) == (True, 1)
    assert (log.prompt_tokens, log.completion_tokens) == (110, 70)


async def test_responses_stream_whose_round_gave_the_answer_streams_that_answer(signer: Signer):
    body_in = {**RESPONSES_BODY, "stream": True}
    outcome = await _serve(
        signer,
        [_json(RESPONSE_CALLS), _json(RESPONSE_ANSWERS)],
        body_in,
        responses=True,
        max_rounds=2,
    )
    assert [sent["stream"] for sent in outcome.sent] == [False, False]
    verify_responses_stream(outcome.body, signer.public_key_b64, request=outcome.raw_request)
    events = [json.loads(p) for p in responses_signed_payloads(outcome.body)]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == ANSWER_TEXT
    assert events[-1]["response"][ROUNDS_FIELD] == [RESPONSES_ROUND]
    assert events[-1]["response"]["usage"] == RESPONSES_SUMMED
    log = _only_log(outcome)
    assert (log.prompt_tokens, log.completion_tokens, log.tool_calls) == (110, 70, 1)


async def test_responses_that_do_not_declare_the_tool_get_the_call_unrun(signer: Signer):
    body_in = {**RESPONSES_BODY, "tools": [{"type": "function", "name": "get_weather"}]}
    outcome = await _serve(signer, [_json(RESPONSE_CALLS)], body_in, responses=True)
    assert outcome.executor.calls == []
    assert len(outcome.sent) == 1
    body = json.loads(outcome.body)
    assert body["output"] == [FUNCTION_CALL]
    assert ROUNDS_FIELD not in body


async def test_responses_with_tools_off_runs_nothing(signer: Signer):
    outcome = await _serve(
        signer, [_json(RESPONSE_CALLS)], RESPONSES_BODY, responses=True, tools=False
    )
    assert outcome.executor.calls == []
    assert len(outcome.sent) == 1
    assert json.loads(outcome.body)["output"] == [FUNCTION_CALL]
