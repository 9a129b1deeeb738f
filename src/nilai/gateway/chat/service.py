"""The chat pipeline in order: validate and route, relay, sign, account."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import orjson

from nilai.crypto.keys import Signer
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import NilaiError, UpstreamProtocolError, UpstreamTimeout
from nilai.gateway.chat.context import RequestContext
from nilai.gateway.chat.relay import Relay, error_event, parse_completion
from nilai.gateway.chat.signing import StreamSigner, sign_completion
from nilai.gateway.chat.validate import ValidatedChat, validate_chat
from nilai.protocol.base import json_object
from nilai.protocol.chat import ChatCompletionRequest
from nilai.upstream.sse import DONE, frame, iter_payloads

logger = logging.getLogger(__name__)


class ChatService:
    """Serves chat completions: one instance per process, shared by all requests."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        snapshot: DiscoverySnapshot,
        signer: Signer,
        *,
        request_timeout_s: float,
    ) -> None:
        self._snapshot = snapshot
        self._relay = Relay(http, snapshot)
        self._signer = signer
        self._timeout_s = request_timeout_s

    def validate(self, request: ChatCompletionRequest) -> ValidatedChat:
        """Resolve the model and check the request against it."""
        return validate_chat(request, self._snapshot)

    async def complete(self, chat: ValidatedChat, ctx: RequestContext) -> bytes:
        """Run a non-streaming completion and return the signed body."""
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._relay.send(chat.model, chat.payload, ctx, stream=False)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"The request took longer than {self._timeout_s:g}s.") from exc
        body = parse_completion(response.content)
        ctx.record_usage(body.get("usage"))
        _log_done(ctx, chat)
        return sign_completion(body, self._signer, ctx.request_sha256)

    async def stream(self, chat: ValidatedChat, ctx: RequestContext) -> AsyncIterator[bytes]:
        """Open the upstream stream (failing with a real status) and return the SSE relay."""
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._relay.send(chat.model, chat.payload, ctx, stream=True)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"The request took longer than {self._timeout_s:g}s.") from exc
        return self._relay_stream(response, chat, ctx)

    async def _relay_stream(
        self, response: httpx.Response, chat: ValidatedChat, ctx: RequestContext
    ) -> AsyncIterator[bytes]:
        relay = _StreamRelay(StreamSigner(self._signer, ctx.request_sha256), ctx)
        try:
            async for payload in iter_payloads(response.aiter_raw()):
                if payload == DONE:
                    break
                for out in relay.feed(payload, include_usage=chat.request.include_usage):
                    yield frame(out)
            for out in relay.finish():
                yield frame(out)
        except asyncio.CancelledError:
            ctx.status = 499  # the client went away; closing the response cancels upstream
            raise
        except NilaiError as exc:
            ctx.status = exc.status
            yield frame(error_event(exc))
        except httpx.TimeoutException:
            ctx.status = 504
            yield frame(error_event(UpstreamTimeout("The model server stopped sending.")))
        except httpx.HTTPError:
            ctx.status = 502
            error = UpstreamProtocolError("The model server broke the stream.")
            yield frame(error_event(error))
        finally:
            await response.aclose()
            _log_done(ctx, chat)
        yield frame(DONE)


class _StreamRelay:
    """Decides, chunk by chunk, what to forward and which chunk carries the signature.

    A chunk that finishes the choice is held back until the upstream ends, because the
    signature goes on the last chunk the client receives, and only the end tells which one
    that is. Every other chunk goes out at once, unchanged.
    """

    def __init__(self, signer: StreamSigner, ctx: RequestContext) -> None:
        self._signer = signer
        self._ctx = ctx
        self._held: tuple[bytes, dict[str, Any]] | None = None
        self._usage_chunk: dict[str, Any] | None = None

    def feed(self, payload: bytes, *, include_usage: bool) -> list[bytes]:
        """Take one upstream payload; return the payloads to send now."""
        chunk = _parse_chunk(payload)
        if b"\n" in payload or b"\r" in payload:
            # One event per line is what clients and the verifier read; re-encode compactly.
            payload = orjson.dumps(chunk)
        self._ctx.mark_first_token()
        if chunk.get("usage"):
            self._ctx.record_usage(chunk["usage"])
        if not chunk.get("choices"):
            if chunk.get("usage") is not None and include_usage:
                self._usage_chunk = chunk
            return []
        out = self._release()
        if _finishes(chunk):
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


def _finishes(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    items = cast(list[object], choices)
    return any((c := json_object(item)) and c.get("finish_reason") for item in items)


def _log_done(ctx: RequestContext, chat: ValidatedChat) -> None:
    logger.info(
        "chat model=%s endpoint=%s stream=%s status=%d prompt_tokens=%d completion_tokens=%d "
        "ttft_ms=%s latency_ms=%.1f",
        chat.model,
        ctx.endpoint,
        chat.request.stream,
        ctx.status,
        ctx.prompt_tokens,
        ctx.completion_tokens,
        "-" if ctx.first_token_s is None else f"{ctx.first_token_s * 1000:.1f}",
        (time.perf_counter() - ctx.started) * 1000,
    )
