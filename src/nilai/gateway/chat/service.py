"""The chat pipeline in order: validate and route, send upstream, sign (or stream), account.

Every request that reaches the pipeline is accounted exactly once, in a ``finally``: completed,
failed, or abandoned by the client. The streaming path after the upstream answered lives in
``nilai.gateway.chat.stream``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from starlette.types import Receive

from nilai.auth.nuc_policies import check_request_policies
from nilai.context.prompts import PromptsOff, PromptVault
from nilai.context.search import setup as search_setup
from nilai.context.search.service import SearchOutcome, WebSearch
from nilai.context.setup import NOT_CONFIGURED
from nilai.crypto.keys import Signer
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import (
    ContextUnavailable,
    NilaiError,
    ShuttingDown,
    UpstreamTimeout,
    rate_limit_headers,
)
from nilai.gateway.chat.context import RequestContext
from nilai.gateway.chat.dispatch import Dispatcher, PlannerCall, parse_completion, read_body
from nilai.gateway.chat.signing import StreamSigner, sign_completion
from nilai.gateway.chat.stream import (
    ChatStream,
    ChunkForwarder,
    ReadDeadline,
    read_batches,
    relay_events,
)
from nilai.gateway.chat.validate import (
    ValidatedChat,
    ignored_fields_headers,
    validate_chat,
)
from nilai.gateway.disconnect import cancelled_on_disconnect
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import OTHER_MODEL, Metrics
from nilai.limits.base import Decision
from nilai.limits.policy import Admission
from nilai.protocol.chat import ChatCompletionRequest
from nilai.upstream.client import UpstreamClient, UpstreamResponse
from nilai.usage.sink import UsageSink

logger = logging.getLogger(__name__)

SOURCE_CHARS_PER_CONTEXT_TOKEN = 1.5
"""Web sources may fill about half of the room the model's context leaves the prompt, at a
conservative 3 characters per token: the client's messages and the answer need the rest."""


class ChatService:
    """Serves chat completions: one instance per process, shared by all requests."""

    def __init__(
        self,
        upstream: UpstreamClient,
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
        prompts: PromptVault | None = None,
        web_search: WebSearch | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._prompts: PromptVault = prompts or PromptsOff(NOT_CONFIGURED)
        self._web_search = web_search
        self._dispatcher = Dispatcher(upstream, snapshot)
        self._signer = signer
        self._usage = usage
        self._admission = admission
        self._metrics = metrics
        self._drain = drain
        self._timeout_s = request_timeout_s
        self._first_byte_timeout_s = first_byte_timeout_s
        self._idle_timeout_s = idle_timeout_s

    async def _check(self, request: ChatCompletionRequest, ctx: RequestContext) -> ValidatedChat:
        """Describe the request in ``ctx``, then check it against policies and its model.

        A request refused for its model or parameters still counts against the caller's
        limits (a 429 wins over the refusal once they are used up), so that invalid requests
        are not a free way to load the gateway. Valid ones are counted in ``_admit``.
        """
        ctx.model = request.model
        ctx.streamed = request.stream
        ctx.tools = bool(request.tools)
        ctx.web_search = request.web_search
        ctx.nilrag = bool(request.nilrag)
        ctx.multimodal = request.has_image()
        check_request_policies(ctx.principal, request)
        try:
            chat = validate_chat(request, self._snapshot)
            if request.web_search and self._web_search is None:
                raise ContextUnavailable(
                    f"Web search is not available on this gateway ({search_setup.NOT_CONFIGURED}).",
                    code="web_search_not_configured",
                )
        except NilaiError:
            await self._admission.admit(ctx.principal, web_search=request.web_search)
            raise
        return chat

    async def _with_private_prompt(self, chat: ValidatedChat, ctx: RequestContext) -> ValidatedChat:
        """``chat`` with the system prompt the caller's token names in nilDB put first.

        Called once the request is admitted, so that a caller over its limits cannot make the
        gateway read every nilDB node. The prompt is never logged, stored or returned.
        """
        document = ctx.principal.prompt_document
        if document is None:
            return chat
        prompt = await self._prompts.reveal(document)
        ctx.prompt_document = True
        return chat.with_system_context(prompt)

    async def _with_web_search(
        self, chat: ValidatedChat, ctx: RequestContext
    ) -> tuple[ValidatedChat, SearchOutcome | None]:
        """``chat`` with the web sources for its last question put first, and the search.

        Called once the request is admitted, holding the model slot the planner's call uses;
        the search has its own time limits (planner, searches, pages), and the request timeout
        then applies to the answer. The planner sees the client's messages only: a private
        prompt must never reach the search provider inside a query. The planner's tokens are
        the client's (``usage``), counted even when the search then fails; the queries, results
        and pages are never logged or stored.
        """
        if not chat.request.web_search or self._web_search is None:
            return chat, None
        planner = PlannerCall(self._dispatcher, chat.model)
        budget = None
        if (context := chat.card.max_model_len) is not None:
            room = context - (chat.request.requested_max_tokens or 0)
            budget = max(0, int(room * SOURCE_CHARS_PER_CONTEXT_TOKEN))
        try:
            outcome = await self._web_search.run(
                chat.request.messages, planner, max_total_chars=budget
            )
        finally:
            ctx.count_planner(planner.prompt_tokens, planner.completion_tokens)
        ctx.searches = outcome.searches
        return chat.with_system_context(outcome.message["content"]), outcome

    async def _with_context(
        self, chat: ValidatedChat, ctx: RequestContext, receive: Receive | None
    ) -> tuple[ValidatedChat, SearchOutcome | None]:
        """The context stages, in order: the private prompt, then the web search.

        With the request's ``receive``, a client that disconnects during the web search
        cancels it (``ClientGone``): planning, searches and page fetches are work done for it
        alone. Inside the request's ``try``, so the request is accounted (499) and releases
        what it holds however the cancellation lands.
        """
        chat = await self._with_private_prompt(chat, ctx)
        if receive is None or not chat.request.web_search:
            return await self._with_web_search(chat, ctx)
        async with cancelled_on_disconnect(receive):
            return await self._with_web_search(chat, ctx)

    def _admit(
        self, chat: ValidatedChat, ctx: RequestContext
    ) -> contextlib.AbstractAsyncContextManager[Decision]:
        """Count the request against the caller's limits and hold a slot of its model.

        One step (one round trip to Redis): both happen or neither, so a request refused for
        its model's concurrency uses none of the caller's budget.
        """
        web_search = chat.request.web_search
        return self._admission.admit_to_model(ctx.principal, chat.model, web_search=web_search)

    @staticmethod
    def _headers(chat: ValidatedChat, decision: Decision) -> dict[str, str]:
        return rate_limit_headers(decision) | ignored_fields_headers(chat.request)

    async def _send[T](
        self,
        chat: ValidatedChat,
        ctx: RequestContext,
        then: Callable[[UpstreamResponse], Awaitable[T]],
    ) -> T:
        """Send the request and run ``then`` on the answer, all within the request timeout."""
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s) as timeout:
                with self._drain.watch(timeout):
                    answer = await self._dispatcher.send(
                        chat.model, chat.payload, stream=chat.request.stream
                    )
                    ctx.endpoint = answer.endpoint
                    result = await then(await answer.ok())
        except TimeoutError as exc:
            if self._drain.passed():
                raise ShuttingDown(
                    "The gateway is shutting down and could not finish this request in time; "
                    "send it again."
                ) from None
            raise UpstreamTimeout(f"The request took longer than {self._timeout_s:g}s.") from exc
        ctx.upstream_s = time.perf_counter() - sent
        return result

    async def complete(
        self, request: ChatCompletionRequest, ctx: RequestContext, receive: Receive | None = None
    ) -> ChatResult:
        """Run a non-streaming completion and return the signed body.

        ``receive`` (the request's ASGI receive, its body read) lets a disconnect stop the
        context stages; see ``_with_context``.
        """
        try:
            chat = await self._check(request, ctx)
            async with self._admit(chat, ctx) as decision:
                chat, search = await self._with_context(chat, ctx, receive)
                body = parse_completion(await self._send(chat, ctx, read_body))
            ctx.add_planner_tokens(body.get("usage"))
            ctx.record_usage(body.get("usage"))
            signed = sign_completion(
                body, self._signer, ctx.request_sha256, added=_signed_additions(search)
            )
            return ChatResult(signed, self._headers(chat, decision))
        except BaseException as exc:
            ctx.fail(exc)
            raise
        finally:
            self.account(ctx)

    async def stream(
        self, request: ChatCompletionRequest, ctx: RequestContext, receive: Receive | None = None
    ) -> ChatStream:
        """Open the upstream stream (failing with a real status) and return the SSE events.

        ``receive`` as for ``complete``.

        The model slot, the upstream response and the accounting belong to the returned
        ``ChatStream`` and end with its ``aclose``, whether or not the events were consumed.
        The slot and the upstream response are released earlier, as soon as the upstream
        answer has ended: before the client reads ``[DONE]`` and sends its next request.
        """
        resources = AsyncExitStack()
        upstream = AsyncExitStack()
        resources.push_async_callback(upstream.aclose)
        try:
            chat = await self._check(request, ctx)
            decision = await upstream.enter_async_context(self._admit(chat, ctx))
            chat, search = await self._with_context(chat, ctx, receive)
            response = await self._send(chat, ctx, _headers_only)
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
        deadline = ReadDeadline(self._first_byte_timeout_s, self._idle_timeout_s, self._drain)
        signer = StreamSigner(self._signer, ctx.request_sha256, added=_signed_additions(search))
        forwarder = ChunkForwarder(signer, ctx, chat.request)
        events = relay_events(
            read_batches(response.iter_chunks(), deadline, self._drain),
            forwarder,
            ctx,
            release=upstream.aclose,
        )
        return ChatStream(events, resources, self._headers(chat, decision))

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
            searches=ctx.searches,
        )
        if ctx.upstream_s is not None:
            self._metrics.upstream_duration.labels(
                model, "stream" if ctx.streamed else "plain"
            ).observe(ctx.upstream_s)
        logger.info(
            "chat model=%s endpoint=%s stream=%s status=%d error=%s prompt_tokens=%d "
            "completion_tokens=%d searches=%d ttft_ms=%s",
            ctx.model,
            ctx.endpoint,
            ctx.streamed,
            ctx.status,
            ctx.error_kind or "-",
            ctx.prompt_tokens,
            ctx.completion_tokens,
            ctx.searches,
            "-" if ctx.first_token_s is None else f"{ctx.first_token_s * 1000:.1f}",
        )


def _signed_additions(search: SearchOutcome | None) -> dict[str, object]:
    """What the gateway adds inside the signed answer: a web search's ``sources``."""
    return {} if search is None else {"sources": search.sources}


async def _headers_only(response: UpstreamResponse) -> UpstreamResponse:
    """A stream's answer: its body is read by the relay, not within the request timeout."""
    return response


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A signed completion body and the rate-limit headers to send with it."""

    body: bytes
    headers: dict[str, str]
