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
Only with ``responses_support`` on (off by default) does that route exist and ``/v1/models``
announce ``"responses"`` in each model's ``supported_features``; off, it answers 404. Likewise
``tool_support`` makes ``/v1/models`` say the models support tools.

Server-side tools (all off by default; see ``FakeConfig.tool_code``): with ``tool_code`` set, a
request that declares the function tool ``tool_name`` (``execute_python`` unless changed) is
answered with ``tool_calls_per_answer`` structured calls of it, whose ``arguments`` are
``json.dumps({"code": tool_code})`` (chat: ids ``call_1``..; Responses: ``fc_1``.. with
``call_id`` ``call_1``..); a request that ends with tool results (chat ``tool`` messages,
Responses ``function_call_output`` items) is answered with text quoting them,
``"<name> says: the tool said <results>"`` (each result stripped, several joined by ``"; "``).
No call when ``tool_choice`` is ``"none"`` or a result already follows the last user message.
``tool_call_as_text`` answers with text that merely looks like a call. Usage: one completion
token per streamed delta that carries something (the role chunk aside): the usual words
``tokens + 1``; a chat call 4 (its header delta and three argument pieces); a Responses call 3
(its three argument deltas); a quote 5; the text call 5. Every chat request body is kept in
``stats.bodies``, every Responses body in ``stats.responses_bodies``.

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
    tool_support: bool = False
    """Whether ``/v1/models`` says the models support tools (the gateway refuses ``tools``
    for a model that does not)."""
    responses_function_call: bool = False
    """Answer a Responses request that has ``tools`` with a call of the first tool (not when
    its ``tool_choice`` is ``"none"``)."""
    tool_code: str | None = None
    """Server-side tools on: the code of every call of ``tool_name`` the fake answers with, and
    the switch for answering tool results with a quote of them (None: off)."""
    tool_calls_per_answer: int = 1
    """How many calls (ids ``call_1`` .. ``call_<n>``) one tool-call answer holds (at least 1)."""
    tool_call_as_text: bool = False
    """Answer with plain text that looks like a call: ``{"name": "<tool_name>", "arguments":
    {"code": "print(1)"}}`` on one line (``TOOL_CALL_TEXT_CODE``), never with ``tool_calls``."""
    tool_name: str = "execute_python"
    """The function tool the fake calls, when the request declares it under that name."""


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
    bodies: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    """Every chat request body, planner calls included, in the order they arrived."""
    responses_bodies: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    """Every ``POST /v1/responses`` body (while that route exists), in order."""


class FakeState:
    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.stats = FakeStats()

    def words(self) -> list[str]:
        return [f"{self.config.name} says:", *(f" w{i}" for i in range(self.config.tokens))]


PLANNER_PREFIX = "You decide what to search the web for"


def _is_planner_call(body: dict[str, Any]) -> bool:
    messages = _messages(body)
    content = messages[0].get("content") if messages else None
    return isinstance(content, str) and content.startswith(PLANNER_PREFIX)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat request's messages that are objects (anything else is skipped)."""
    messages: object = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [
        cast(dict[str, Any], message)
        for message in cast(list[object], messages)
        if isinstance(message, dict)
    ]


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
                "tool_support": state.config.tool_support,
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
        state.stats.bodies.append(body)
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
        answer = _chat_answer(state, body)
        if body.get("stream"):
            return StreamingResponse(_stream(state, body, answer), media_type="text/event-stream")
        return _completion(state, body, answer)

    async def responses(request: Request) -> Response:
        if not state.config.responses_support:
            return JSONResponse({"error": {"message": "Not Found"}}, status_code=404)
        body = await request.json()
        state.stats.responses_requests += 1
        state.stats.last_responses_body = body
        state.stats.responses_bodies.append(body)
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
        answer = _responses_answer(state, body)
        usage = _responses_usage(body, sum(len(pieces) for _item, pieces in answer))
        state.stats.completed += 1
        state.stats.usages.append(usage)
        return JSONResponse(
            _response_object(body, "completed", [item for item, _p in answer], usage)
        )

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


def _completion(state: FakeState, body: dict[str, Any], answer: _ChatAnswer) -> Response:
    """The whole (non-streamed) chat completion of ``answer``."""
    state.stats.completed += 1
    state.stats.usages.append(_usage(body, len(answer.deltas)))
    return JSONResponse(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": state.config.name,
            "choices": [{"index": 0, "message": answer.message, "finish_reason": answer.finish}],
            "usage": _usage(body, len(answer.deltas)),
        }
    )


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


async def _first_byte(config: FakeConfig) -> None:
    """Wait as the config says before a stream's first byte."""
    if config.first_byte_delay_s:
        await asyncio.sleep(config.first_byte_delay_s)
    await _hold_until(config.first_byte_at)


def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None, sent: int = 0) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": body.get("model"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if _stream_options(body).get("continuous_usage_stats"):
        obj["usage"] = _usage(body, sent)
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _stream_options(body: dict[str, Any]) -> dict[str, Any]:
    options: object = body.get("stream_options")
    return cast(dict[str, Any], options) if isinstance(options, dict) else {}


async def _stream(
    state: FakeState, body: dict[str, Any], answer: _ChatAnswer
) -> AsyncIterator[bytes]:
    state.stats.streams_started += 1
    config = state.config
    finished = False
    try:
        if config.first_byte_delay_s:
            await asyncio.sleep(config.first_byte_delay_s)
        await _hold_until(config.first_byte_at)
        yield _chunk(body, {"role": "assistant", "content": ""}, None)
        deltas = answer.deltas
        for i, delta in enumerate(deltas):
            if config.token_delay_s:
                await asyncio.sleep(config.token_delay_s)
            if config.fault == "drop_mid_stream" and i == len(deltas) // 2:
                raise ConnectionAbortedError("fake drop")
            if config.fault == "malformed_json" and i == len(deltas) // 2:
                yield b"data: {not json\n\n"
            if config.fault == "error_event" and i == len(deltas) // 2:
                yield b'data: {"error": {"message": "engine died"}}\n\n'
                return
            yield _chunk(body, delta, None, i + 1)
        if config.fault == "no_final_chunk":
            yield b"data: [DONE]\n\n"
            finished = True
            return
        yield _chunk(body, {}, answer.finish, len(deltas))
        state.stats.usages.append(_usage(body, len(deltas)))
        if _stream_options(body).get("include_usage"):
            usage: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": body.get("model"),
                "choices": [],
                "usage": _usage(body, len(deltas)),
            }
            yield b"data: " + json.dumps(usage).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        if finished:
            state.stats.completed += 1
        elif config.fault != "drop_mid_stream":
            state.stats.cancelled += 1


TOOL_CALL_TEXT_CODE = "print(1)"
"""The code in the text that ``tool_call_as_text`` answers with."""
CHAT_TOKENS_PER_CALL = 4
"""A chat tool call's completion tokens: its header delta and its three argument pieces."""
RESPONSES_TOKENS_PER_CALL = 3
"""A Responses function call's output tokens: its three argument deltas."""


@dataclass
class _ChatAnswer:
    """A chat answer: the deltas it streams (one completion token each), and whole."""

    deltas: list[dict[str, Any]]
    finish: str
    message: dict[str, Any]


def _text_answer(pieces: list[str]) -> _ChatAnswer:
    return _ChatAnswer(
        [{"content": piece} for piece in pieces],
        "stop",
        {"role": "assistant", "content": "".join(pieces)},
    )


def _tool_call_text(config: FakeConfig) -> list[str]:
    """``{"name": "<tool_name>", "arguments": {"code": "print(1)"}}`` in space-split pieces."""
    text = json.dumps({"name": config.tool_name, "arguments": {"code": TOOL_CALL_TEXT_CODE}})
    first, *rest = text.split(" ")
    return [first, *(" " + word for word in rest)]


def _quote(config: FakeConfig, results: list[str]) -> list[str]:
    """``"<name> says: the tool said <results>"`` in pieces: 5 completion tokens."""
    quoted = "; ".join(result.strip() for result in results)
    return [f"{config.name} says:", " the", " tool", " said", " " + quoted]


def _argument_pieces(arguments: str) -> list[str]:
    """``{"code": "..."}`` in three pieces, as an engine streams a call's arguments."""
    code = str(json.loads(arguments)["code"])
    return ['{"code": ', json.dumps(code), "}"]


def _call_count(config: FakeConfig) -> int:
    return max(1, config.tool_calls_per_answer)


def _declares(tools: object, name: str) -> bool:
    """Whether ``tools`` declares the function ``name``, in the chat or the Responses shape."""
    if not isinstance(tools, list):
        return False
    for entry in cast(list[object], tools):
        if not isinstance(entry, dict):
            continue
        tool = cast(dict[str, object], entry)
        function = tool.get("function")
        declared = tool.get("name")
        if isinstance(function, dict):
            declared = cast(dict[str, object], function).get("name", declared)
        if tool.get("type") == "function" and declared == name:
            return True
    return False


def _text_of(content: object) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            cast(dict[str, object], p) for p in cast(list[object], content) if isinstance(p, dict)
        ]
        return "".join(str(part.get("text", "")) for part in parts)
    return ""


def _trailing_tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """The contents of the ``tool`` messages that end the conversation, in order."""
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, _text_of(message.get("content")))
    return results


def _tool_result_since_user(messages: list[dict[str, Any]]) -> bool:
    """Whether a ``tool`` message follows the last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return False
        if message.get("role") == "tool":
            return True
    return False


def _chat_answer(state: FakeState, body: dict[str, Any]) -> _ChatAnswer:
    """Tool results quoted, a text that looks like a call, tool calls, or the usual words."""
    config = state.config
    messages = _messages(body)
    if config.tool_code is not None and (results := _trailing_tool_results(messages)):
        return _text_answer(_quote(config, results))
    if config.tool_call_as_text:
        return _text_answer(_tool_call_text(config))
    if (
        config.tool_code is not None
        and body.get("tool_choice") != "none"
        and _declares(body.get("tools"), config.tool_name)
        and not _tool_result_since_user(messages)
    ):
        return _calls_answer(config, config.tool_code)
    return _text_answer(state.words())


def _calls_answer(config: FakeConfig, code: str) -> _ChatAnswer:
    arguments = json.dumps({"code": code})
    calls: list[dict[str, Any]] = []
    deltas: list[dict[str, Any]] = []
    for index in range(_call_count(config)):
        call_id = f"call_{index + 1}"
        function = {"name": config.tool_name, "arguments": arguments}
        calls.append({"id": call_id, "type": "function", "function": function})
        header: dict[str, Any] = {"index": index, "id": call_id, "type": "function"}
        header["function"] = {"name": config.tool_name, "arguments": ""}
        deltas.append({"tool_calls": [header]})
        deltas.extend(
            {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            for piece in _argument_pieces(arguments)
        )
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    return _ChatAnswer(deltas, "tool_calls", message)


def _input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The Responses ``input`` items that are objects (a string input has none)."""
    items: object = body.get("input")
    if not isinstance(items, list):
        return []
    return [cast(dict[str, Any], i) for i in cast(list[object], items) if isinstance(i, dict)]


def _trailing_call_outputs(items: list[dict[str, Any]]) -> list[str]:
    """The ``output`` of the ``function_call_output`` items that end the input, in order."""
    outputs: list[str] = []
    for item in reversed(items):
        if item.get("type") != "function_call_output":
            break
        outputs.insert(0, _text_of(item.get("output")))
    return outputs


def _call_output_since_user(items: list[dict[str, Any]]) -> bool:
    """Whether a ``function_call_output`` item follows the last user item."""
    for item in reversed(items):
        if item.get("role") == "user":
            return False
        if item.get("type") == "function_call_output":
            return True
    return False


def _message_item(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_fake",
        "role": "assistant",
        "status": "completed",
        "content": [_text_part(text)],
    }


def _responses_answer(
    state: FakeState, body: dict[str, Any]
) -> list[tuple[dict[str, Any], list[str]]]:
    """The output items with the deltas each streams (one output token each)."""
    config = state.config
    items = _input_items(body)
    if config.tool_code is not None and (outputs := _trailing_call_outputs(items)):
        pieces = _quote(config, outputs)
        return [(_message_item("".join(pieces)), pieces)]
    if config.tool_call_as_text:
        pieces = _tool_call_text(config)
        return [(_message_item("".join(pieces)), pieces)]
    if (
        config.tool_code is not None
        and body.get("tool_choice") != "none"
        and _declares(body.get("tools"), config.tool_name)
        and not _call_output_since_user(items)
    ):
        arguments = json.dumps({"code": config.tool_code})
        calls = [
            {
                "type": "function_call",
                "id": f"fc_{n}",
                "call_id": f"call_{n}",
                "name": config.tool_name,
                "arguments": arguments,
                "status": "completed",
            }
            for n in range(1, _call_count(config) + 1)
        ]
        return [(call, _argument_pieces(arguments)) for call in calls]
    item = _responses_item(state, body)
    return [(item, _item_pieces(state, item))]


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
    if body.get("tool_choice") == "none":
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


def _start_events(events: _Events, body: dict[str, Any]) -> list[bytes]:
    """``response.created`` and ``response.in_progress``."""
    pending = _response_object(body, "in_progress", [], None)
    return [
        events("response.created", response=pending),
        events("response.in_progress", response=pending),
    ]


def _opening_events(events: _Events, item: dict[str, Any], index: int) -> list[bytes]:
    """The empty item at ``index`` (and its empty text part)."""
    added = {**item, "status": "in_progress"}
    if item["type"] == "message":
        added["content"] = []
    else:
        added["arguments"] = ""
    opening = [events("response.output_item.added", output_index=index, item=added)]
    if item["type"] == "message":
        opening.append(
            events(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=_text_part(""),
            )
        )
    return opening


def _delta_event(events: _Events, item: dict[str, Any], piece: str, index: int) -> bytes:
    if item["type"] == "message":
        return events(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            delta=piece,
            logprobs=[],
        )
    return events(
        "response.function_call_arguments.delta",
        item_id=item["id"],
        output_index=index,
        delta=piece,
    )


def _closing_events(events: _Events, item: dict[str, Any], index: int) -> list[bytes]:
    """The ``done`` events of the text part (or arguments) and of the item."""
    where: dict[str, Any] = {"item_id": item["id"], "output_index": index}
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
    closing.append(events("response.output_item.done", output_index=index, item=item))
    return closing


def _midway_fault(config: FakeConfig, events: _Events) -> bytes | None:
    """What the fault sends midway through an item's deltas (a dropped connection raises)."""
    if config.fault == "drop_mid_stream":
        raise ConnectionAbortedError("fake drop")
    if config.fault == "malformed_json":
        return b"event: response.output_text.delta\ndata: {not json\n\n"
    if config.fault == "error_event":
        return events("error", code="engine_error", message="engine died", param=None)
    return None


async def _responses_stream(state: FakeState, body: dict[str, Any]) -> AsyncIterator[bytes]:
    state.stats.streams_started += 1
    config = state.config
    events = _Events()
    finished = False
    try:
        await _first_byte(config)
        answer = _responses_answer(state, body)
        for event in _start_events(events, body):
            yield event
        for index, (item, pieces) in enumerate(answer):
            for event in _opening_events(events, item, index):
                yield event
            for i, piece in enumerate(pieces):
                if config.token_delay_s:
                    await asyncio.sleep(config.token_delay_s)
                if i == len(pieces) // 2 and (fault := _midway_fault(config, events)):
                    yield fault
                    if config.fault == "error_event":
                        return
                yield _delta_event(events, item, piece, index)
            for event in _closing_events(events, item, index):
                yield event
        if config.fault == "no_final_chunk":
            finished = True
            return
        usage = _responses_usage(body, sum(len(pieces) for _item, pieces in answer))
        state.stats.usages.append(usage)
        done = _response_object(body, "completed", [item for item, _p in answer], usage)
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
