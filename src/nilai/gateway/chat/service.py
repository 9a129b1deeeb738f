"""The chat pipeline in order: validate and route, relay, sign, account.

Every request that reaches the pipeline is accounted exactly once, in a ``finally``: completed,
failed, or abandoned by the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, cast

import httpx
import orjson

from nilai.auth.nuc_policies import check_request_policies
from nilai.crypto.domains import CHAT_COMPLETION_CHUNK_OBJECT
from nilai.crypto.keys import Signer
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import (
    NilaiError,
    NotSupported,
    ShuttingDown,
    UpstreamProtocolError,
    UpstreamTimeout,
    rate_limit_headers,
)
from nilai.gateway.chat.context import RequestContext
from nilai.gateway.chat.relay import Relay, error_event, parse_completion
from nilai.gateway.chat.signing import StreamSigner, claim_object, sign_completion
from nilai.gateway.chat.validate import ValidatedChat, validate_chat
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import OTHER_MODEL, Metrics
from nilai.limits.policy import Admission
from nilai.protocol.base import json_object
from nilai.protocol.chat import ChatCompletionRequest
from nilai.upstream.sse import DONE, frame, iter_payload_batches, one_line
from nilai.usage.sink import UsageSink

logger = logging.getLogger(__name__)


class ChatService:
    """Serves chat completions: one instance per process, shared by all requests."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        snapshot: DiscoverySnapshot,
        signer: Signer,
        usage: UsageSink,
        admission: Admission,
        *,
        metrics: Metrics,
        drain: Drain,
        request_timeout_s: float,
        first_byte_timeout_s: float = 60.0,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self._snapshot = snapshot
        self._relay = Relay(http, snapshot)
        self._signer = signer
        self._usage = usage
        self._admission = admission
        self._metrics = metrics
        self._drain = drain
        self._timeout_s = request_timeout_s
        self._first_byte_timeout_s = first_byte_timeout_s
        self._idle_timeout_s = idle_timeout_s

    async def _admit(
        self, request: ChatCompletionRequest, ctx: RequestContext
    ) -> tuple[ValidatedChat, dict[str, str]]:
        """Describe the request, count it against the caller's limits, then check it."""
        ctx.model = request.model
        ctx.streamed = request.stream
        ctx.tools = bool(request.tools)
        ctx.web_search = request.web_search
        ctx.nilrag = bool(request.nilrag)
        ctx.multimodal = request.has_image()
        check_request_policies(ctx.principal, request)
        if ctx.principal.prompt_document is not None:
            raise NotSupported(
                "This token references a nilDB prompt document; this gateway cannot fetch "
                "prompt documents yet, so the request is refused rather than served without it."
            )
        decision = await self._admission.admit(ctx.principal, web_search=request.web_search)
        return validate_chat(request, self._snapshot), rate_limit_headers(decision)

    async def _send(self, chat: ValidatedChat, ctx: RequestContext) -> httpx.Response:
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s) as timeout:
                with self._drain.watch(timeout):
                    response = await self._relay.send(
                        chat.model, chat.payload, ctx, stream=chat.request.stream
                    )
        except TimeoutError as exc:
            if self._drain.passed():
                raise ShuttingDown(
                    "The gateway is shutting down and could not finish this request in time; "
                    "send it again."
                ) from None
            raise UpstreamTimeout(f"The request took longer than {self._timeout_s:g}s.") from exc
        ctx.upstream_s = time.perf_counter() - sent
        return response

    async def complete(self, request: ChatCompletionRequest, ctx: RequestContext) -> ChatResult:
        """Run a non-streaming completion and return the signed body."""
        try:
            chat, headers = await self._admit(request, ctx)
            async with self._admission.model_slot(chat.model):
                response = await self._send(chat, ctx)
            body = parse_completion(response.content)
            ctx.record_usage(body.get("usage"))
            return ChatResult(sign_completion(body, self._signer, ctx.request_sha256), headers)
        except BaseException as exc:
            ctx.fail(exc)
            raise
        finally:
            self.account(ctx)

    async def stream(self, request: ChatCompletionRequest, ctx: RequestContext) -> ChatStream:
        """Open the upstream stream (failing with a real status) and return the SSE relay.

        The model slot, the upstream response and the accounting belong to the returned
        ``ChatStream`` and end with its ``aclose``, whether or not the events were consumed.
        The slot and the upstream response are released earlier, as soon as the upstream
        answer has ended: before the client reads ``[DONE]`` and sends its next request.
        """
        resources = AsyncExitStack()
        upstream = AsyncExitStack()
        resources.push_async_callback(upstream.aclose)
        try:
            chat, headers = await self._admit(request, ctx)
            await upstream.enter_async_context(self._admission.model_slot(chat.model))
            response = await self._send(chat, ctx)
            upstream.push_async_callback(response.aclose)
        except BaseException as exc:
            ctx.fail(exc)
            await resources.aclose()
            self.account(ctx)
            raise
        resources.callback(self.account, ctx)
        streams = self._metrics.streams_in_flight
        streams.inc()
        resources.callback(streams.dec)
        events = self._relay_stream(response, chat, ctx, release_upstream=upstream.aclose)
        return ChatStream(events, resources, headers)

    async def _relay_stream(
        self,
        response: httpx.Response,
        chat: ValidatedChat,
        ctx: RequestContext,
        *,
        release_upstream: Callable[[], Awaitable[None]],
    ) -> AsyncGenerator[bytes]:
        """Relay the upstream events; the last write carries the signed end and ``[DONE]``."""
        relay = _StreamRelay(StreamSigner(self._signer, ctx.request_sha256), ctx, chat.request)
        batches = self._timed(iter_payload_batches(response.aiter_raw()))
        try:
            error: NilaiError | None = None
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    events, error, done = _relay_batch(relay, batch)
                    if events:
                        yield b"".join(events)
                    if error is not None or done:
                        break
            if error is None:
                ending = b"".join(frame(out) for out in relay.finish())
            else:
                ending = _failed(ctx, error)
        except NilaiError as exc:
            ending = _failed(ctx, exc)
        except httpx.TimeoutException:
            ending = _failed(ctx, UpstreamTimeout("The model server stopped sending."))
        except httpx.HTTPError:
            ending = _failed(ctx, UpstreamProtocolError("The model server broke the stream."))
        except BaseException as exc:  # the client went away; closing the response cancels upstream
            ctx.fail(exc)
            raise
        # The answer is complete: free the model slot before the client can see the end, so a
        # client that never has more than N requests open is never refused by a limit of N.
        await release_upstream()
        yield ending + frame(DONE)

    async def _timed[T](self, payloads: AsyncGenerator[T]) -> AsyncGenerator[T]:
        """Pass payloads on, ending with a timeout if the first or any next one is too late.

        At shutdown the wait ends at the drain's cut-off instead, with ``ShuttingDown``.
        """
        limit, what = self._first_byte_timeout_s, "first token"
        async with contextlib.aclosing(payloads):
            while True:
                try:
                    async with asyncio.timeout(limit) as timeout:
                        with self._drain.watch(timeout):
                            payload = await anext(payloads)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if self._drain.passed():
                        raise ShuttingDown(
                            "The gateway is shutting down; the stream ended before the answer "
                            "was complete. Send the request again."
                        ) from None
                    raise UpstreamTimeout(
                        f"The model server did not send its {what} within {limit:g}s."
                    ) from None
                yield payload
                limit, what = self._idle_timeout_s, "next token"

    def account(self, ctx: RequestContext) -> None:
        """Queue the query log, record the metrics, log one line (counts only, no content)."""
        log = ctx.query_log()
        self._usage.put(log)
        model = ctx.model if self._snapshot.card(ctx.model) is not None else OTHER_MODEL
        self._metrics.observe_chat(
            model=model,
            stream=ctx.streamed,
            status=ctx.status,
            duration_s=log.latency_ms / 1000,
            ttft_s=ctx.first_token_s,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            error_kind=ctx.error_kind,
            limit=ctx.refused_by,
        )
        if ctx.upstream_s is not None:
            self._metrics.upstream_duration.labels(
                model, "stream" if ctx.streamed else "plain"
            ).observe(ctx.upstream_s)
        logger.info(
            "chat model=%s endpoint=%s stream=%s status=%d error=%s prompt_tokens=%d "
            "completion_tokens=%d ttft_ms=%s",
            ctx.model,
            ctx.endpoint,
            ctx.streamed,
            ctx.status,
            ctx.error_kind or "-",
            ctx.prompt_tokens,
            ctx.completion_tokens,
            "-" if ctx.first_token_s is None else f"{ctx.first_token_s * 1000:.1f}",
        )


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A signed completion body and the rate-limit headers to send with it."""

    body: bytes
    headers: dict[str, str]


@dataclass(slots=True)
class ChatStream:
    """SSE events to send, and what must be released once they are sent (or abandoned)."""

    events: AsyncGenerator[bytes]
    resources: AsyncExitStack
    headers: dict[str, str]

    async def aclose(self) -> None:
        """Stop the relay, close upstream, free the model slot and account the request."""
        await self.events.aclose()
        await self.resources.aclose()


class _StreamRelay:
    """Decides, chunk by chunk, what to forward and which chunk carries the signature.

    A chunk that finishes the choice is held back until the upstream ends, because the
    signature goes on the last chunk the client receives, and only the end tells which one
    that is. Every other chunk goes out at once. Usage that the gateway asked for on its own
    account (running totals on each chunk, the final usage chunk) is kept from clients that did
    not ask for it. As in OpenAI's API, a client that asked for usage gets it once, on a final
    chunk with no choices; only ``continuous_usage_stats`` puts it on every chunk.
    """

    def __init__(
        self, signer: StreamSigner, ctx: RequestContext, request: ChatCompletionRequest
    ) -> None:
        self._signer = signer
        self._ctx = ctx
        self._include_usage = request.include_usage
        options = request.stream_options
        extra = (options.model_extra or {}) if options else {}
        self._continuous = bool(extra.get("continuous_usage_stats"))
        self._held: tuple[bytes, dict[str, Any]] | None = None
        self._usage_chunk: dict[str, Any] | None = None

    def feed(self, payload: bytes) -> list[bytes]:
        """Take one upstream payload; return the payloads to send now."""
        chunk = _parse_chunk(payload)
        # The verifier accepts only chunks that say what they are; add it where upstream didn't.
        claimed = claim_object(chunk, CHAT_COMPLETION_CHUNK_OBJECT)
        self._ctx.mark_first_token()
        usage = chunk.get("usage")
        if usage:
            self._ctx.record_usage(usage)
        if not chunk.get("choices"):
            if usage is not None and self._include_usage:
                self._usage_chunk = chunk
            return []
        finishing = _finishes(chunk)
        if usage and finishing and self._include_usage:
            # The usage chunk is the client's only usage; keep it for the end in case the
            # model server sends none of its own.
            self._usage_chunk = self._usage_chunk or _usage_only(chunk)
        if "usage" in chunk and not self._continuous:
            del chunk["usage"]
            payload = orjson.dumps(chunk)
        elif claimed or b"\n" in payload or b"\r" in payload:
            # Send the added ``object``, and one event per line (what clients and the verifier
            # read): re-encode compactly.
            payload = orjson.dumps(chunk)
        payload = one_line(payload)
        if _has_content(chunk):
            self._ctx.count_chunk()
        out = self._release()
        if finishing:
            self._held = (payload, chunk)
        else:
            out.append(self._signer.sent(payload))
        return out

    def finish(self) -> list[bytes]:
        """The upstream ended: send what is held, signing the very last chunk."""
        if self._usage_chunk is not None:
            return [*self._release(), self._signer.last(self._usage_chunk)]
        if self._held is not None:
            _, chunk = self._held
            self._held = None
            return [self._signer.last(chunk)]
        raise UpstreamProtocolError("The model server ended the stream without a final chunk.")

    def _release(self) -> list[bytes]:
        if self._held is None:
            return []
        payload, _ = self._held
        self._held = None
        return [self._signer.sent(payload)]


def _failed(ctx: RequestContext, error: NilaiError) -> bytes:
    """Record ``error`` as the request's outcome; return the event that tells the client."""
    ctx.fail(error)
    return frame(error_event(error))


def _relay_batch(
    relay: _StreamRelay, batch: list[bytes]
) -> tuple[list[bytes], NilaiError | None, bool]:
    """Relay a batch of upstream payloads: the SSE events, then what ended it early.

    Returns the events, the error that cut the batch short (if any), and whether the upstream
    said ``[DONE]``.
    """
    events: list[bytes] = []
    for payload in batch:
        if payload == DONE:
            return events, None, True
        try:
            events += [frame(out) for out in relay.feed(payload)]
        except NilaiError as exc:
            return events, exc, False
    return events, None, False


def _parse_chunk(payload: bytes) -> dict[str, Any]:
    try:
        chunk = json_object(orjson.loads(payload))
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError("The model server sent a malformed stream chunk.") from exc
    if chunk is None:
        raise UpstreamProtocolError("The model server sent an unexpected stream chunk.")
    if "error" in chunk:
        raise UpstreamProtocolError("The model server reported an error mid-stream.")
    return chunk


def _usage_only(chunk: dict[str, Any]) -> dict[str, Any]:
    """The final usage chunk OpenAI sends: the chunk's identity and usage, no choices."""
    return {**{key: value for key, value in chunk.items() if key != "choices"}, "choices": []}


def _choices(chunk: dict[str, Any]) -> list[dict[str, object]]:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    return [c for item in cast(list[object], choices) if (c := json_object(item)) is not None]


def _finishes(chunk: dict[str, Any]) -> bool:
    return any(choice.get("finish_reason") for choice in _choices(chunk))


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in _choices(chunk):
        delta = json_object(choice.get("delta"))
        if delta and delta.get("content"):
            return True
    return False
