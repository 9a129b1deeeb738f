"""A fake OpenAI-compatible model server with fault injection, for tests.

Deterministic text (``"<name> says: w0 w1 w2 ..."``), a per-token delay, and faults chosen over
``POST /_control``: ``http_500``, ``malformed_json``, ``drop_mid_stream``, ``slow_first_byte``,
``error_event``, ``no_final_chunk``. ``GET /_control/stats`` tells what it saw, including
streams the client abandoned (``cancelled``) and the usage of every answer it finished
(``usages``, so a test can sum what the gateway should bill).

A web search's planner call (its first message is the planner's instructions, which start with
``PLANNER_PREFIX``) is answered with ``planner_reply`` when set (else the usual words), after
``planner_delay_s``; ``planner_requests`` counts those calls.

``POST /v1/responses`` answers in vLLM's Responses API shapes: one output message with the same
words (or, with ``tools`` in the request and ``responses_function_call`` set, a call of the
first tool), or with ``stream`` the typed events ``response.created`` ... ``response.completed``.
Only with ``responses_support`` on (off by default, as the gateway does not route the
Responses API yet) does that route exist and ``/v1/models`` announce ``"responses"`` in each
model's ``supported_features``; off, it answers 404.

Run alone: ``python -m tests.fakes.fake_openai_server --port 9001 --model fake-model``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class FakeConfig:
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    name: str = "fake"
    tokens: int = 8
    token_delay_s: float = 0.0
    first_byte_delay_s: float = 0.0
    first_byte_at: float = 0.0
    """Hold every answer's first byte until this ``time.time()`` (0: off), so that streams
    arriving over a while all start together."""
    models_delay_s: float = 0.0
    """How long ``GET /v1/models`` takes to answer (counted in the stats when it arrives)."""
    fault: str = "none"
    max_model_len: int = 4096
    planner_reply: str | None = None
    """The planner call's answer (e.g. a JSON plan); None: the usual words."""
    planner_delay_s: float = 0.0
    responses_support: bool = False
    """Whether ``POST /v1/responses`` exists and ``/v1/models`` announces it."""
    responses_function_call: bool = False
    """Answer a Responses request that has ``tools`` with a call of the first tool."""


@dataclass
class FakeStats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    streams_started: int = 0
    model_list_requests: int = 0
    planner_requests: int = 0
    last_body: dict[str, Any] | None = None
    """The last request that was not a planner call."""
    usages: list[dict[str, int]] = field(default_factory=list[dict[str, int]])
    """The final usage of every answer finished, planner calls included, in order."""
    responses_requests: int = 0
    """``POST /v1/responses`` calls (they leave ``requests`` and ``last_body`` alone); their
    usages, in the Responses shape (``input_tokens``, ...), go to ``usages`` too."""
    last_responses_body: dict[str, Any] | None = None


class FakeState:
    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.stats = FakeStats()

    def words(self) -> list[str]:
        return [f"{self.config.name} says:", *(f" w{i}" for i in range(self.config.tokens))]


PLANNER_PREFIX = "You decide what to search the web for"


def _is_planner_call(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    first = messages[0] if messages else {}
    content = first.get("content") if isinstance(first, dict) else None
    return isinstance(content, str) and content.startswith(PLANNER_PREFIX)


def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def create_fake_app(config: FakeConfig | None = None) -> Starlette:
    state = FakeState(config or FakeConfig())

    async def models(_request: Request) -> Response:
        state.stats.model_list_requests += 1
        if state.config.models_delay_s:
            await asyncio.sleep(state.config.models_delay_s)
        features = ["chat_completion"]
        if state.config.responses_support:
            features.append("responses")
        data = [
            {
                "id": model,
                "object": "model",
                "created": 1700000000,
                "owned_by": "fake",
                "max_model_len": state.config.max_model_len,
                "supported_features": features,
            }
            for model in state.config.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(_request: Request) -> Response:
        return Response(status_code=200)

    async def control(request: Request) -> Response:
        changes = await request.json()
        for key, value in changes.items():
            setattr(state.config, key, value)
        return JSONResponse(asdict(state.config))

    async def stats(_request: Request) -> Response:
        return JSONResponse(asdict(state.stats))

    async def chat(request: Request) -> Response:
        body = await request.json()
        state.stats.requests += 1
        if _is_planner_call(body) and not body.get("stream"):
            return await _plan(state, body)
        state.stats.last_body = body
        fault = state.config.fault
        if fault == "http_500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if fault == "http_400":
            return JSONResponse({"error": {"message": "context too long"}}, status_code=400)
        if state.config.first_byte_delay_s and not body.get("stream"):
            await asyncio.sleep(state.config.first_byte_delay_s)
        if not body.get("stream"):
            await _hold_until(state.config.first_byte_at)
        if fault == "malformed_json" and not body.get("stream"):
            return Response(b'{"choices": [', media_type="application/json")
        if body.get("stream"):
            return StreamingResponse(_stream(state, body), media_type="text/event-stream")
        words = state.words()
        state.stats.completed += 1
        state.stats.usages.append(_usage(body, len(words)))
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "system_fingerprint": state.config.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(words)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(body, len(words)),
            }
        )

    async def responses(request: Request) -> Response:
        if not state.config.responses_support:
            return JSONResponse({"error": {"message": "Not Found"}}, status_code=404)
        body = await request.json()
        state.stats.responses_requests += 1
        state.stats.last_responses_body = body
        fault = state.config.fault
        if fault == "http_500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if fault == "http_400":
            return JSONResponse({"error": {"message": "context too long"}}, status_code=400)
        if body.get("stream"):
            return StreamingResponse(_responses_stream(state, body), media_type="text/event-stream")
        if state.config.first_byte_delay_s:
            await asyncio.sleep(state.config.first_byte_delay_s)
        await _hold_until(state.config.first_byte_at)
        if fault == "malformed_json":
            return Response(b'{"output": [', media_type="application/json")
        item = _responses_item(state, body)
        usage = _responses_usage(body, len(_item_pieces(state, item)))
        state.stats.completed += 1
        state.stats.usages.append(usage)
        return JSONResponse(_response_object(body, "completed", [item], usage))

    app = Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/health", health),
            Route("/_control", control, methods=["POST"]),
            Route("/_control/stats", stats),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
        ]
    )
    app.state.fake = state
    return app


async def _plan(state: FakeState, body: dict[str, Any]) -> Response:
    state.stats.planner_requests += 1
    config = state.config
    if config.planner_delay_s:
        await asyncio.sleep(config.planner_delay_s)
    text = config.planner_reply if config.planner_reply is not None else "".join(state.words())
    usage = _usage(body, len(text.split()))
    state.stats.usages.append(usage)
    return JSONResponse(
        {
            "id": "chatcmpl-plan",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )


async def _hold_until(moment: float) -> None:
    if moment and (wait := moment - time.time()) > 0:
        await asyncio.sleep(wait)


def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None, sent: int = 0) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": body.get("model"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if (body.get("stream_options") or {}).get("continuous_usage_stats"):
        obj["usage"] = _usage(body, sent)
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _stream(state: FakeState, body: dict[str, Any]) -> AsyncIterator[bytes]:
    state.stats.streams_started += 1
    config = state.config
    finished = False
    try:
        if config.first_byte_delay_s:
            await asyncio.sleep(config.first_byte_delay_s)
        await _hold_until(config.first_byte_at)
        yield _chunk(body, {"role": "assistant", "content": ""}, None)
        words = state.words()
        for i, word in enumerate(words):
            if config.token_delay_s:
                await asyncio.sleep(config.token_delay_s)
            if config.fault == "drop_mid_stream" and i == len(words) // 2:
                raise ConnectionAbortedError("fake drop")
            if config.fault == "malformed_json" and i == len(words) // 2:
                yield b"data: {not json\n\n"
            if config.fault == "error_event" and i == len(words) // 2:
                yield b'data: {"error": {"message": "engine died"}}\n\n'
                return
            yield _chunk(body, {"content": word}, None, i + 1)
        if config.fault == "no_final_chunk":
            yield b"data: [DONE]\n\n"
            finished = True
            return
        yield _chunk(body, {}, "stop", len(words))
        state.stats.usages.append(_usage(body, len(words)))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            usage = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": body.get("model"),
                "choices": [],
                "usage": _usage(body, len(words)),
            }
            yield b"data: " + json.dumps(usage).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        if finished:
            state.stats.completed += 1
        elif config.fault != "drop_mid_stream":
            state.stats.cancelled += 1


def _words_in(value: object) -> int:
    """Whitespace-separated words in the text of a Responses ``input`` (or any of its parts)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words_in(part) for part in cast(list[object], value))
    if isinstance(value, dict):
        item = cast(dict[str, object], value)
        return sum(_words_in(item.get(key)) for key in ("content", "text", "output"))
    return 0


def _responses_usage(body: dict[str, Any], output_tokens: int) -> dict[str, Any]:
    """vLLM's Responses usage: input words (input and instructions) and output pieces."""
    input_tokens = _words_in(body.get("input")) + _words_in(body.get("instructions"))
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _function_call_wanted(state: FakeState, body: dict[str, Any]) -> str | None:
    """The first tool's name, when this answer is to be a call of it."""
    tools: object = body.get("tools")
    if not state.config.responses_function_call or not isinstance(tools, list):
        return None
    listed = cast(list[object], tools)
    first: object = listed[0] if listed else None
    if not isinstance(first, dict):
        return None
    tool = cast(dict[str, object], first)
    name = tool.get("name")
    function = tool.get("function")  # chat-style {"function": {"name"}}
    if name is None and isinstance(function, dict):
        name = cast(dict[str, object], function).get("name")
    return str(name) if name is not None else "tool"


def _responses_item(state: FakeState, body: dict[str, Any]) -> dict[str, Any]:
    """The one output item: a function call when asked for, else the assistant's message."""
    name = _function_call_wanted(state, body)
    if name is not None:
        return {
            "type": "function_call",
            "id": "fc_fake",
            "call_id": "call_fake",
            "name": name,
            "arguments": "{}",
            "status": "completed",
        }
    return {
        "type": "message",
        "id": "msg_fake",
        "role": "assistant",
        "status": "completed",
        "content": [_text_part("".join(state.words()))],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _item_pieces(state: FakeState, item: dict[str, Any]) -> list[str]:
    """The deltas an item streams in: one per word, or the arguments of a function call."""
    return state.words() if item["type"] == "message" else [str(item["arguments"])]


def _response_object(
    body: dict[str, Any], status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
) -> dict[str, Any]:
    """A Responses API ``response`` object as vLLM sends it."""
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": 1700000000,
        "model": body.get("model"),
        "status": status,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "output": output,
        "parallel_tool_calls": True,
        "temperature": body.get("temperature", 1.0),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "incomplete_details": None,
        "error": None,
        "usage": usage,
    }


class _Events:
    """Typed SSE events whose data names the type and carries the next sequence number."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, event_type: str, **fields: Any) -> bytes:
        data = {"type": event_type, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return f"event: {event_type}\ndata: {json.dumps(data)}\n\n".encode()


def _opening_events(events: _Events, body: dict[str, Any], item: dict[str, Any]) -> list[bytes]:
    """From ``response.created`` to the empty item (and its empty text part)."""
    pending = _response_object(body, "in_progress", [], None)
    added = {**item, "status": "in_progress"}
    if item["type"] == "message":
        added["content"] = []
    else:
        added["arguments"] = ""
    opening = [
        events("response.created", response=pending),
        events("response.in_progress", response=pending),
        events("response.output_item.added", output_index=0, item=added),
    ]
    if item["type"] == "message":
        opening.append(
            events(
                "response.content_part.added",
                item_id=item["id"],
                output_index=0,
                content_index=0,
                part=_text_part(""),
            )
        )
    return opening


def _delta_event(events: _Events, item: dict[str, Any], piece: str) -> bytes:
    if item["type"] == "message":
        return events(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=0,
            content_index=0,
            delta=piece,
            logprobs=[],
        )
    return events(
        "response.function_call_arguments.delta", item_id=item["id"], output_index=0, delta=piece
    )


def _closing_events(events: _Events, item: dict[str, Any]) -> list[bytes]:
    """The ``done`` events of the text part (or arguments) and of the item."""
    where: dict[str, Any] = {"item_id": item["id"], "output_index": 0}
    if item["type"] == "message":
        part = item["content"][0]
        closing = [
            events(
                "response.output_text.done",
                **where,
                content_index=0,
                text=part["text"],
                logprobs=[],
            ),
            events("response.content_part.done", **where, content_index=0, part=part),
        ]
    else:
        closing = [
            events("response.function_call_arguments.done", **where, arguments=item["arguments"])
        ]
    closing.append(events("response.output_item.done", output_index=0, item=item))
    return closing


async def _responses_stream(state: FakeState, body: dict[str, Any]) -> AsyncIterator[bytes]:
    state.stats.streams_started += 1
    config = state.config
    events = _Events()
    finished = False
    try:
        if config.first_byte_delay_s:
            await asyncio.sleep(config.first_byte_delay_s)
        await _hold_until(config.first_byte_at)
        item = _responses_item(state, body)
        for event in _opening_events(events, body, item):
            yield event
        pieces = _item_pieces(state, item)
        for i, piece in enumerate(pieces):
            if config.token_delay_s:
                await asyncio.sleep(config.token_delay_s)
            if config.fault == "drop_mid_stream" and i == len(pieces) // 2:
                raise ConnectionAbortedError("fake drop")
            if config.fault == "malformed_json" and i == len(pieces) // 2:
                yield b"event: response.output_text.delta\ndata: {not json\n\n"
            if config.fault == "error_event" and i == len(pieces) // 2:
                yield events("error", code="engine_error", message="engine died", param=None)
                return
            yield _delta_event(events, item, piece)
        for event in _closing_events(events, item):
            yield event
        if config.fault == "no_final_chunk":
            finished = True
            return
        usage = _responses_usage(body, len(pieces))
        state.stats.usages.append(usage)
        done = _response_object(body, "completed", [item], usage)
        yield events("response.completed", response=done)
        finished = True
    finally:
        if finished:
            state.stats.completed += 1
        elif config.fault != "drop_mid_stream":
            state.stats.cancelled += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", dest="models")
    parser.add_argument("--name", default="fake")
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args()
    config = FakeConfig(
        models=args.models or ["fake-model"], name=args.name, token_delay_s=args.token_delay
    )
    uvicorn.run(create_fake_app(config), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
