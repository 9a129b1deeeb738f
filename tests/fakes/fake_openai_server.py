"""A fake OpenAI-compatible model server with fault injection, for tests.

Deterministic text (``"<name> says: w0 w1 w2 ..."``), a per-token delay, and faults chosen over
``POST /_control``: ``http_500``, ``malformed_json``, ``drop_mid_stream``, ``slow_first_byte``,
``error_event``, ``no_final_chunk``. ``GET /_control/stats`` tells what it saw, including
streams the client abandoned (``cancelled``) and the usage of every answer it finished
(``usages``, so a test can sum what the gateway should bill).

A web search's planner call (its first message is the planner's instructions, which start with
``PLANNER_PREFIX``) is answered with ``planner_reply`` when set (else the usual words), after
``planner_delay_s``; ``planner_requests`` counts those calls.

Run alone: ``python -m tests.fakes.fake_openai_server --port 9001 --model fake-model``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

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
        data = [
            {
                "id": model,
                "object": "model",
                "created": 1700000000,
                "owned_by": "fake",
                "max_model_len": state.config.max_model_len,
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

    app = Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/health", health),
            Route("/_control", control, methods=["POST"]),
            Route("/_control/stats", stats),
            Route("/v1/chat/completions", chat, methods=["POST"]),
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
