"""The stages every API's pipeline shares: limits, context, the model call, streams, accounting.

Chat completions (``nilai.gateway.chat.service``) and the Responses API
(``nilai.gateway.responses.service``) run the same stages in the same order: describe the
request and check it (a refusal still counts against the caller's limits), admit it (limits and
a model slot in one step), add the context (the private prompt, then the web search), send it
to a model server within the request timeout, sign the answer or relay the stream, and account
the request exactly once. What differs is each API's request, payload and answer shape; the
stages themselves live here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Sequence,
)
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any

import orjson
from starlette.types import Receive

from nilai.billing.meter import CreditMeter
from nilai.billing.prices import Price, PriceBook
from nilai.context.prompts import PromptsOff, PromptVault
from nilai.context.rag import retriever as rag_retriever
from nilai.context.rag.retriever import Retrieved, Retriever
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
    ValidationFailed,
)
from nilai.gateway.chat.context import CHARS_PER_TOKEN, RequestContext
from nilai.gateway.chat.dispatch import CHAT_PATH, Dispatcher, PlannerCall, read_body
from nilai.gateway.chat.stream import (
    CHAT_FRAMING,
    ChatStream,
    ReadDeadline,
    SseFraming,
    StreamTranslator,
    read_batches,
    relay_events,
)
from nilai.gateway.disconnect import cancelled_on_disconnect
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import OTHER_MODEL, Metrics
from nilai.gateway.tools.loop import ToolDialect, ToolRounds, run_tool_rounds
from nilai.limits.base import Decision
from nilai.limits.policy import Admission
from nilai.protocol.chat import ChatMessage
from nilai.protocol.models import ModelCard
from nilai.protocol.nilrag import NilragRequest
from nilai.tools.server import ServerTools
from nilai.upstream.client import UpstreamClient, UpstreamResponse
from nilai.usage.sink import UsageSink

logger = logging.getLogger(__name__)

SOURCE_CHARS_PER_CONTEXT_TOKEN = 1.5
"""Web sources may fill about half of the room the model's context leaves the prompt, at a
conservative 3 characters per token: the client's messages and the answer need the rest."""


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """What the shared stages need to know of a validated request, whatever its API."""

    card: ModelCard
    payload: bytes
    stream: bool
    web_search: bool
    requested_max_tokens: int | None
    path: str = CHAT_PATH
    feature: str | None = None
    """A capability the model server must announce for the model (``responses``)."""
    conversation_param: str = "messages"
    """The request field that holds the conversation (``input`` for Responses)."""

    @property
    def model(self) -> str:
        """The model id."""
        return self.card.id


@dataclass(frozen=True, slots=True)
class SignedAnswer:
    """A signed answer's body and the headers to send with it (rate limits, ignored fields)."""

    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class OpenedStream:
    """A stream whose model server answered: how to relay it and the headers to send."""

    body: AsyncIterator[bytes]
    """The SSE body to relay: the model server's, or a whole answer's (``completion_as_stream``)."""
    translator: StreamTranslator
    headers: dict[str, str]
    framing: SseFraming = CHAT_FRAMING


class ModelPipeline:
    """The shared stages; one subclass per API, one instance per process."""

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
        tools: ServerTools | None = None,
        tool_max_rounds: int = 1,
        retriever: Retriever | None = None,
        prices: PriceBook | None = None,
        meter: CreditMeter | None = None,
        default_max_tokens: int = 4096,
        max_searches: int = 3,
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
        self._tools = tools
        self._tool_max_rounds = tool_max_rounds
        self._retriever = retriever
        self._prices = prices
        self._meter = meter
        self._default_max_tokens = default_max_tokens
        self._max_searches = max_searches

    # --- checking and admitting ---------------------------------------------------------------

    async def _checked[T](
        self,
        ctx: RequestContext,
        web_search: bool,
        check: Callable[[], T],
        *,
        nilrag: bool = False,
    ) -> T:
        """Run ``check`` (the API's validation); a refusal still counts against the limits.

        A request refused for its model or parameters counts against the caller's limits (a 429
        wins over the refusal once they are used up), so that invalid requests are not a free
        way to load the gateway. Valid ones are counted in ``_admit``.
        """
        try:
            result = check()
            if web_search and self._web_search is None:
                raise ContextUnavailable(
                    f"Web search is not available on this gateway ({search_setup.NOT_CONFIGURED}).",
                    code="web_search_not_configured",
                )
            if nilrag and self._retriever is None:
                raise ContextUnavailable(
                    f"NilRAG is not available on this gateway ({rag_retriever.NOT_CONFIGURED}).",
                    code="nilrag_not_configured",
                )
        except NilaiError:
            await self._admission.admit(ctx.principal, web_search=web_search)
            raise
        return result

    @contextlib.asynccontextmanager
    async def _admit(self, request: ModelRequest, ctx: RequestContext) -> AsyncGenerator[Decision]:
        """Count the request against the caller's limits, hold a slot of its model, lock funds.

        Limits and slot in one step (one round trip to Redis): both happen or neither, so a
        request refused for its model's concurrency uses none of the caller's budget. Then, for
        a metered caller, the request's estimated cost is locked at the credit service; a
        request refused before this point locks nothing, and a lock made is settled exactly
        once, when the request is accounted (``account``).
        """
        admitted = self._admission.admit_to_model(
            ctx.principal, request.model, web_search=request.web_search
        )
        async with admitted as decision:
            ctx.price = self._price(request.model)
            await self._lock_funds(request, ctx)
            yield decision

    def _price(self, model: str) -> Price | None:
        return None if self._prices is None else self._prices.price(model)

    async def _lock_funds(self, request: ModelRequest, ctx: RequestContext) -> None:
        """Lock the most the request may cost, for a caller the credit service meters.

        The estimate: the request body's size as prompt tokens (4 characters each, more than
        its text), ``max_tokens`` (or the configured default) as completion tokens, and every
        search a web search may make. Server-side tool rounds and a private prompt can make
        the real cost higher; the unlock charges the real cost whatever the lock was.
        """
        credit = ctx.principal.credit
        if credit is None or self._meter is None or ctx.price is None:
            return
        prompt = -(-len(request.payload) // CHARS_PER_TOKEN)
        completion = request.requested_max_tokens or self._default_max_tokens
        searches = self._max_searches if request.web_search else 0
        estimate = ctx.price.cost(prompt, completion, searches)
        ctx.credit_lock = await self._meter.lock(credit, estimate)

    # --- context --------------------------------------------------------------------------------

    async def _private_prompt(self, ctx: RequestContext) -> str | None:
        """The system prompt the caller's token names in nilDB, if it names one.

        Called once the request is admitted, so that a caller over its limits cannot make the
        gateway read every nilDB node. The prompt is never logged, stored or returned.
        """
        document = ctx.principal.prompt_document
        if document is None:
            return None
        prompt = await self._prompts.reveal(document)
        ctx.prompt_document = True
        return prompt

    async def _search(
        self,
        request: ModelRequest,
        conversation: Sequence[ChatMessage],
        ctx: RequestContext,
        receive: Receive | None,
    ) -> SearchOutcome | None:
        """The web search for the conversation's last question, if the request asked for one.

        Called once the request is admitted, holding the model slot the planner's call uses;
        the search has its own time limits (planner, searches, pages), and the request timeout
        then applies to the answer. The planner sees the client's messages only: a private
        prompt must never reach the search provider inside a query. The planner's tokens are
        the client's (``usage``), counted even when the search then fails; the queries, results
        and pages are never logged or stored.

        With the request's ``receive``, a client that disconnects during the search cancels
        it (``ClientGone``): planning, searches and page fetches are work done for it alone.
        The caller is inside the request's ``try``, so the request is accounted (499) and
        releases what it holds however the cancellation lands.
        """
        if not request.web_search or self._web_search is None:
            return None
        return await _for_client(receive, self._run_search(request, conversation, ctx))

    async def _retrieve(
        self,
        nilrag: NilragRequest,
        question: str,
        ctx: RequestContext,
        receive: Receive | None,
    ) -> Retrieved:
        """The chunks of the client's documents closest to ``question`` (NilRAG).

        Called once the request is admitted. The node round trips have their own deadline and
        count in the request's time limit; the question, the chunks and the client's node
        tokens are never logged or stored (the query log records that NilRAG ran and how many
        chunks it added). A client that disconnects cancels it, as for the web search.
        """
        if self._retriever is None:  # refused in ``_checked``
            raise ContextUnavailable(f"NilRAG is not available ({rag_retriever.NOT_CONFIGURED}).")
        if not question.strip():
            raise ValidationFailed(
                "nilrag needs a user message with text to look up.",
                param="messages",
                code="invalid_value",
            )
        retriever = self._retriever

        async def retrieve() -> Retrieved:
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await retriever.retrieve(nilrag, question)
            except TimeoutError:
                raise UpstreamTimeout(
                    f"NilRAG took longer than the request's {self._timeout_s:g}s."
                ) from None

        retrieved = await _for_client(receive, retrieve())
        ctx.nilrag_chunks = len(retrieved.chunks)
        return retrieved

    async def _run_search(
        self, request: ModelRequest, conversation: Sequence[ChatMessage], ctx: RequestContext
    ) -> SearchOutcome:
        if self._web_search is None:  # refused in ``_checked``
            raise ContextUnavailable("Web search is not available on this gateway.")
        planner = PlannerCall(self._dispatcher, request.model)
        budget = None
        if (context := request.card.max_model_len) is not None:
            room = context - (request.requested_max_tokens or 0)
            budget = max(0, int(room * SOURCE_CHARS_PER_CONTEXT_TOKEN))
        try:
            outcome = await self._web_search.run(
                conversation,
                planner,
                max_total_chars=budget,
                conversation_param=request.conversation_param,
            )
        finally:
            ctx.count_earlier_call(planner.prompt_tokens, planner.completion_tokens)
        ctx.searches = outcome.searches
        return outcome

    # --- the model call -------------------------------------------------------------------------

    async def _send[T](
        self,
        request: ModelRequest,
        ctx: RequestContext,
        then: Callable[[UpstreamResponse], Awaitable[T]],
    ) -> T:
        """Send the request and run ``then`` on the answer, all within the request timeout."""
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s) as timeout:
                with self._drain.watch(timeout):
                    answer = await self._dispatcher.send(
                        request.model,
                        request.payload,
                        stream=request.stream,
                        path=request.path,
                        feature=request.feature,
                    )
                    ctx.endpoint = answer.endpoint
                    response = await answer.ok()
                    ctx.model_accepted = True
                    result = await then(response)
        except TimeoutError as exc:
            if self._drain.passed():
                raise ShuttingDown(
                    "The gateway is shutting down and could not finish this request in time; "
                    "send it again."
                ) from None
            raise UpstreamTimeout(f"The request took longer than {self._timeout_s:g}s.") from exc
        ctx.upstream_s = time.perf_counter() - sent
        return result

    async def _send_stream(
        self, request: ModelRequest, ctx: RequestContext, upstream: AsyncExitStack
    ) -> UpstreamResponse:
        """Open the model server's stream (its status checked); ``upstream`` will close it."""
        response = await self._send(request, ctx, _headers_only)
        upstream.push_async_callback(response.aclose)
        return response

    # --- tools ----------------------------------------------------------------------------------

    def _server_tools(self, declared: Sequence[str]) -> frozenset[str]:
        """The tools among those the client declared that the gateway runs itself."""
        return frozenset() if self._tools is None else self._tools.implemented(declared)

    async def _tool_rounds(
        self,
        request: ModelRequest,
        dialect: ToolDialect,
        ctx: RequestContext,
        parse: Callable[[bytes], dict[str, Any]],
    ) -> ToolRounds:
        """Run the tool rounds of ``request`` (see ``nilai.gateway.tools.loop``).

        Each round's call is the request's own kind of call, not streamed, within the request
        timeout; its answer is read with ``parse``.
        """
        if self._tools is None:  # the caller asks only when tools are on
            raise ContextUnavailable("Server tools are not enabled on this gateway.")

        async def send(payload: dict[str, Any]) -> dict[str, Any]:
            call = replace(request, payload=orjson.dumps(payload), stream=False)
            return parse(await self._send(call, ctx, read_body))

        return await run_tool_rounds(
            send,
            orjson.loads(request.payload),
            dialect,
            self._tools,
            ctx,
            max_rounds=self._tool_max_rounds,
        )

    async def _answer(
        self,
        request: ModelRequest,
        rounds: ToolRounds | None,
        ctx: RequestContext,
        parse: Callable[[bytes], dict[str, Any]],
    ) -> dict[str, Any]:
        """The whole answer: a tool round's, or the model's call after the rounds (if any)."""
        if rounds is not None and rounds.answer is not None:
            return rounds.answer
        if rounds is not None:
            request = replace(request, payload=orjson.dumps(rounds.payload))
        return parse(await self._send(request, ctx, read_body))

    async def _answer_stream(
        self,
        request: ModelRequest,
        rounds: ToolRounds | None,
        ctx: RequestContext,
        upstream: AsyncExitStack,
        as_stream: Callable[[dict[str, Any]], AsyncIterator[bytes]],
    ) -> AsyncIterator[bytes]:
        """The answer's SSE body: the model server's stream, or a round's answer as a stream.

        ``upstream`` will close the model server's response.
        """
        if rounds is not None and rounds.answer is not None:
            return as_stream(rounds.answer)
        if rounds is not None:
            request = replace(request, payload=orjson.dumps(rounds.payload))
        return (await self._send_stream(request, ctx, upstream)).iter_chunks()

    # --- whole answers and streams --------------------------------------------------------------

    @contextlib.contextmanager
    def _accounted(self, ctx: RequestContext) -> Generator[None]:
        """Account the request when the block ends, recording how it failed if it did."""
        try:
            yield
        except BaseException as exc:
            ctx.fail(exc)
            raise
        finally:
            self.account(ctx)

    async def _stream(
        self,
        ctx: RequestContext,
        open_stream: Callable[[AsyncExitStack], Awaitable[OpenedStream]],
    ) -> ChatStream:
        """Run ``open_stream`` (check, admit, context, send) and return the SSE events.

        ``open_stream`` enters what the upstream side holds (the model slot, the response)
        into the stack it is given. The slot, the upstream response and the accounting belong
        to the returned ``ChatStream`` and end with its ``aclose``, whether or not the events
        were consumed. The slot and the upstream response are released earlier, as soon as the
        upstream answer has ended: before the client reads the end and sends its next request.
        """
        resources = AsyncExitStack()
        upstream = AsyncExitStack()
        resources.push_async_callback(upstream.aclose)
        try:
            opened = await open_stream(upstream)
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
        events = relay_events(
            read_batches(opened.body, deadline, self._drain),
            opened.translator,
            ctx,
            release=upstream.aclose,
            framing=opened.framing,
        )
        return ChatStream(events, resources, opened.headers)

    def account(self, ctx: RequestContext) -> None:
        """Queue the query log, settle the credit lock, record the metrics, log one line.

        The log line has counts only, no content. The cost is the tokens and searches the
        request used at the model's price when it was admitted (nothing before that: a refused
        request costs nothing), charged by unlocking the request's credit lock if it made one.
        """
        ctx.settle()
        if ctx.price is not None:
            ctx.cost_micro = ctx.price.cost(ctx.prompt_tokens, ctx.completion_tokens, ctx.searches)
        if ctx.credit_lock is not None and self._meter is not None:
            lock, ctx.credit_lock = ctx.credit_lock, None
            self._meter.settle(lock, ctx.cost_micro)
        log = ctx.query_log()
        self._usage.put(log)
        model = ctx.model if self._snapshot.card(ctx.model) is not None else OTHER_MODEL
        self._metrics.observe_chat(
            api=ctx.api,
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
            tool_calls=ctx.tool_calls,
        )
        if ctx.upstream_s is not None:
            self._metrics.upstream_duration.labels(
                model, "stream" if ctx.streamed else "plain"
            ).observe(ctx.upstream_s)
        logger.info(
            "%s model=%s endpoint=%s stream=%s status=%d error=%s prompt_tokens=%d "
            "completion_tokens=%d searches=%d tool_calls=%d ttft_ms=%s",
            ctx.api,
            ctx.model,
            ctx.endpoint,
            ctx.streamed,
            ctx.status,
            ctx.error_kind or "-",
            ctx.prompt_tokens,
            ctx.completion_tokens,
            ctx.searches,
            ctx.tool_calls,
            "-" if ctx.first_token_s is None else f"{ctx.first_token_s * 1000:.1f}",
        )


async def _for_client[T](receive: Receive | None, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, cancelled (``ClientGone``) if the client disconnects meanwhile.

    Only for work done for the client alone before the model answers (a web search, NilRAG):
    with ``receive`` (the request's, its body read) a disconnect cancels it.
    """
    if receive is None:
        return await work
    async with cancelled_on_disconnect(receive):
        return await work


def signed_additions(search: SearchOutcome | None) -> dict[str, object]:
    """What the gateway adds inside the signed answer: a web search's ``sources``."""
    return {} if search is None else {"sources": search.sources}


async def _headers_only(response: UpstreamResponse) -> UpstreamResponse:
    """A stream's answer: its body is read by the relay, not within the request timeout."""
    return response
