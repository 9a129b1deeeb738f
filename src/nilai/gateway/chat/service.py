"""The chat pipeline in order: validate and route, send upstream, sign (or stream), account.

Every request that reaches the pipeline is accounted exactly once: completed, failed, or
abandoned by the client. The stages all APIs share live in ``nilai.gateway.pipeline``; the
streaming path after the upstream answered lives in ``nilai.gateway.chat.stream``.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from starlette.types import Receive

from nilai.auth.nuc_policies import check_request_policies
from nilai.context.rag.retriever import context_message
from nilai.context.search.service import SearchOutcome
from nilai.errors import rate_limit_headers
from nilai.gateway.chat.context import RequestContext
from nilai.gateway.chat.dispatch import parse_completion
from nilai.gateway.chat.signing import StreamSigner, sign_completion
from nilai.gateway.chat.stream import ChatStream, ChunkForwarder
from nilai.gateway.chat.validate import (
    ValidatedChat,
    ignored_fields_headers,
    validate_chat,
)
from nilai.gateway.pipeline import ModelPipeline, OpenedStream, SignedAnswer, signed_additions
from nilai.gateway.tools.chat import ChatToolDialect, completion_as_stream
from nilai.gateway.tools.loop import ToolRounds
from nilai.limits.base import Decision
from nilai.protocol.chat import ChatCompletionRequest


class ChatService(ModelPipeline):
    """Serves chat completions: one instance per process, shared by all requests."""

    async def _check(self, request: ChatCompletionRequest, ctx: RequestContext) -> ValidatedChat:
        """Describe the request in ``ctx``, then check it against policies and its model."""
        ctx.model = request.model
        ctx.streamed = request.stream
        ctx.tools = bool(request.tools)
        ctx.web_search = request.web_search
        ctx.nilrag = bool(request.nilrag)
        ctx.multimodal = request.has_image()
        check_request_policies(ctx.principal, request)
        return await self._checked(
            ctx,
            request.web_search,
            lambda: validate_chat(request, self._snapshot),
            nilrag=request.nilrag is not None,
        )

    async def _with_context(
        self, chat: ValidatedChat, ctx: RequestContext, receive: Receive | None
    ) -> tuple[ValidatedChat, SearchOutcome | None]:
        """The context stages, in order: the private prompt, NilRAG, then the web search.

        Each addition goes into the one system message the gateway puts first. ``receive``
        lets a client that disconnects stop the web search (see ``ModelPipeline._search``).
        The prompt as sent is then estimated, in case its usage never comes (``ctx.settle``).
        """
        prompt = await self._private_prompt(ctx)
        if prompt is not None:
            chat = chat.with_system_context(prompt)
        if (nilrag := chat.request.nilrag) is not None:
            question = chat.request.last_user_text()
            retrieved = await self._retrieve(nilrag, question, ctx, receive)
            chat = chat.with_retrieved_context(context_message(retrieved.chunks))
        search = await self._search(chat.model_request, chat.request.messages, ctx, receive)
        if search is not None:
            chat = chat.with_system_context(search.message["content"])
        added = [*chat.system_context, chat.client_system_context or ""]
        ctx.estimate_prompt([*added, *(m.text() for m in chat.request.messages)])
        return chat, search

    @staticmethod
    def _headers(chat: ValidatedChat, decision: Decision) -> dict[str, str]:
        return rate_limit_headers(decision) | ignored_fields_headers(chat.request)

    async def _with_tools(self, chat: ValidatedChat, ctx: RequestContext) -> ToolRounds | None:
        """The tool rounds, when the client declared a server tool (else None)."""
        declared = self._server_tools(chat.request.function_names())
        if not declared:
            return None
        dialect = ChatToolDialect(declared)
        return await self._tool_rounds(chat.model_request, dialect, ctx, parse_completion)

    async def complete(
        self, request: ChatCompletionRequest, ctx: RequestContext, receive: Receive | None = None
    ) -> SignedAnswer:
        """Run a non-streaming completion and return the signed body.

        ``receive`` (the request's ASGI receive, its body read) lets a disconnect stop the
        context stages; see ``ModelPipeline._search``. With server tools declared, the tool
        rounds run first and the answer shows them (``tool_rounds``, signed).
        """
        with self._accounted(ctx):
            chat = await self._check(request, ctx)
            async with self._admit(chat.model_request, ctx) as decision:
                chat, search = await self._with_context(chat, ctx, receive)
                rounds = await self._with_tools(chat, ctx)
                body = await self._answer(chat.model_request, rounds, ctx, parse_completion)
            ctx.add_earlier_calls(body.get("usage"))
            ctx.record_usage(body.get("usage"))
            added = signed_additions(search) | (rounds.signed_additions() if rounds else {})
            signed = sign_completion(body, self._signer, ctx.request_sha256, added=added)
            return SignedAnswer(signed, self._headers(chat, decision))

    async def stream(
        self, request: ChatCompletionRequest, ctx: RequestContext, receive: Receive | None = None
    ) -> ChatStream:
        """Open the upstream stream (failing with a real status) and return the SSE events.

        ``receive`` as for ``complete``; what the returned stream holds, and when it lets go,
        as ``ModelPipeline._stream`` says. With server tools declared, the tool rounds run
        first, not streamed; then the answer streams: the model's last call if the round limit
        was reached, else the round's answer, sent as a stream (``completion_as_stream``).
        """

        async def open_stream(upstream: AsyncExitStack) -> OpenedStream:
            chat = await self._check(request, ctx)
            decision = await upstream.enter_async_context(self._admit(chat.model_request, ctx))
            chat, search = await self._with_context(chat, ctx, receive)
            rounds = await self._with_tools(chat, ctx)
            body = await self._answer_stream(
                chat.model_request, rounds, ctx, upstream, completion_as_stream
            )
            added = signed_additions(search) | (rounds.signed_additions() if rounds else {})
            signer = StreamSigner(self._signer, ctx.request_sha256, added=added)
            forwarder = ChunkForwarder(signer, ctx, chat.request)
            return OpenedStream(body, forwarder, self._headers(chat, decision))

        return await self._stream(ctx, open_stream)
