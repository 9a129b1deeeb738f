"""The local worker's HTTP face: OpenAI's chat and Responses APIs over one engine, one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from nilai.errors import InternalError, InvalidRequest, NotSupported, to_error_body
from nilai.http_errors import install_error_handlers
from nilai.protocol.chat import ChatCompletionRequest
from nilai.protocol.models import ModelCard, ModelList
from nilai.protocol.responses import ResponsesRequest
from nilai.upstream.sse import DONE, frame
from nilai.workers.local.engine import Finished, SamplingParams, collect
from nilai.workers.local.responses import ResponseShaper, chat_messages

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512


class Engine(Protocol):
    """What the server needs from an engine (``TransformersEngine`` or a test double)."""

    model_id: str
    max_model_len: int

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt token ids for a conversation."""
        ...

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[str | Finished]:
        """Text pieces, then ``Finished``."""
        ...


@dataclass(frozen=True, slots=True)
class _Job:
    prompt: list[int]
    params: SamplingParams


_END = object()


class Generations:
    """Runs generations on one thread, in arrival order, and streams their output back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # One thread: generations never overlap, so the model and its RNG are never shared.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    async def run(self, job: _Job, cancelled: threading.Event) -> AsyncGenerator[str | Finished]:
        """Yield the job's output; stopping iteration early cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def work() -> None:
            try:
                if not cancelled.is_set():
                    for item in self.engine.generate(job.prompt, job.params, cancelled):
                        loop.call_soon_threadsafe(queue.put_nowait, item)
            except Exception as exc:  # noqa: BLE001 - handed to the request that owns it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        self._executor.submit(work)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            cancelled.set()

    def close(self) -> None:
        """Stop taking work; the running generation is told to stop by its request."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def create_worker_app(engine: Engine, *, owned_by: str = "nilai-local") -> FastAPI:
    """The OpenAI-compatible app serving ``engine``."""
    generations = Generations(engine)
    card = ModelCard(
        id=engine.model_id,
        created=int(time.time()),
        owned_by=owned_by,
        name=engine.model_id,
        max_model_len=engine.max_model_len,
        supported_features=["chat_completion", "responses"],
    )
    app = FastAPI(title="nilai local worker")
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:  # pyright: ignore[reportUnusedFunction]
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> ModelList:  # pyright: ignore[reportUnusedFunction]
        return ModelList(data=[card])

    async def answer(
        request: Request, job: _Job, shaper: _Completion | ResponseShaper, stream: bool
    ) -> Response:
        cancelled = threading.Event()
        if stream:
            events = shaper.stream(generations.run(job, cancelled))
            return StreamingResponse(events, media_type="text/event-stream")
        watcher = asyncio.create_task(_watch_disconnect(request, cancelled))
        try:
            return Response(
                await shaper.whole(generations.run(job, cancelled)),
                media_type="application/json",
            )
        finally:
            watcher.cancel()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:  # pyright: ignore[reportUnusedFunction]
        job = _job(engine, body)
        return await answer(
            request, job, _Completion(engine.model_id, body, len(job.prompt)), body.stream
        )

    @app.post("/v1/responses", response_model=None)
    async def responses(body: ResponsesRequest, request: Request) -> Response:  # pyright: ignore[reportUnusedFunction]
        job = _prepare(
            engine,
            chat_messages(body),
            wanted=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            params=("input", "max_output_tokens"),
        )
        shaper = ResponseShaper(engine.model_id, body, len(job.prompt))
        return await answer(request, job, shaper, body.stream)

    app.state.generations = generations
    return app


async def _watch_disconnect(request: Request, cancelled: threading.Event) -> None:
    while not cancelled.is_set():
        if await request.is_disconnected():
            cancelled.set()
            return
        await asyncio.sleep(0.1)


def _job(engine: Engine, body: ChatCompletionRequest) -> _Job:
    if body.tools:
        raise InvalidRequest("This worker does not support tools.", param="tools")
    if body.has_image():
        raise InvalidRequest("This worker does not accept images.", param="messages")
    if body.web_search or body.nilrag:
        raise NotSupported("This worker offers plain chat only.")
    messages = [message.model_dump(exclude_none=True) for message in body.messages]
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return _prepare(
        engine,
        messages,
        wanted=body.requested_max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
    )


def _prepare(
    engine: Engine,
    messages: list[dict[str, Any]],
    *,
    wanted: int | None,
    temperature: float | None,
    top_p: float | None,
    stop: tuple[str, ...] = (),
    seed: int | None = None,
    params: tuple[str, str] = ("messages", "max_tokens"),
) -> _Job:
    """Encode the conversation and check it fits; ``params`` name the prompt and limit fields."""
    prompt = engine.encode_chat(messages)
    room = engine.max_model_len - len(prompt)
    prompt_param, limit_param = params
    if room < 1 or (wanted is not None and wanted > room):
        raise InvalidRequest(
            f"The prompt has {len(prompt)} tokens; with {limit_param}={wanted} it exceeds the "
            f"model's context of {engine.max_model_len} tokens.",
            param=prompt_param if room < 1 else limit_param,
            code="context_length_exceeded",
        )
    sampling = SamplingParams(
        max_tokens=wanted or min(DEFAULT_MAX_TOKENS, room),
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=stop,
        seed=seed,
    )
    return _Job(prompt, sampling)


class _Completion:
    """Shapes engine output as OpenAI chat completion objects."""

    def __init__(self, model: str, body: ChatCompletionRequest, prompt_tokens: int) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = body.include_usage
        extra = (body.stream_options.model_extra or {}) if body.stream_options else {}
        # Running usage on every chunk (vLLM's continuous_usage_stats); a text piece is at
        # least one token, and the final chunk carries the exact count.
        self.continuous_usage = bool(extra.get("continuous_usage_stats"))
        self.pieces = 0
        self.prompt_tokens = prompt_tokens

    def _usage(self, finished: Finished) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "total_tokens": self.prompt_tokens + finished.completion_tokens,
        }

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    async def whole(self, output: AsyncIterator[str | Finished]) -> bytes:
        """Collect the whole answer into one completion body."""
        text, finished = await collect(output)
        message = {"role": "assistant", "content": text}
        body = self._envelope("chat.completion")
        body["choices"] = [{"index": 0, "message": message, "finish_reason": _reason(finished)}]
        body["usage"] = self._usage(finished)
        return orjson.dumps(body)

    def _chunk(
        self,
        delta: dict[str, str],
        finish_reason: str | None = None,
        usage: Finished | None = None,
    ) -> bytes:
        chunk = self._envelope("chat.completion.chunk")
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        if self.continuous_usage and usage is not None:
            chunk["usage"] = self._usage(usage)
        return orjson.dumps(chunk)

    async def stream(self, output: AsyncGenerator[str | Finished]) -> AsyncIterator[bytes]:
        """Stream the answer as SSE chunks, usage last when asked for."""
        yield frame(self._chunk({"role": "assistant", "content": ""}))
        try:
            async with contextlib.aclosing(output):
                async for item in output:
                    for event in self._events(item):
                        yield frame(event)
        except Exception:
            logger.exception("generation failed mid-stream")
            error = InternalError("The model failed while generating.")
            yield frame(orjson.dumps(to_error_body(error)))
        yield frame(DONE)

    def _events(self, item: str | Finished) -> list[bytes]:
        if not isinstance(item, Finished):
            self.pieces += 1
            return [self._chunk({"content": item}, usage=Finished("stop", self.pieces))]
        events = [self._chunk({}, _reason(item), usage=item)]
        if self.include_usage:
            chunk = self._envelope("chat.completion.chunk")
            chunk["choices"] = []
            chunk["usage"] = self._usage(item)
            events.append(orjson.dumps(chunk))
        return events


def _reason(finished: Finished) -> str:
    return "stop" if finished.finish_reason == "cancelled" else finished.finish_reason
