"""The Responses API pipeline: the chat pipeline's stages, for ``POST /v1/responses``.

Validate (no server-side state; a model whose servers serve the Responses API), admit (the same
limits and model slots as chat), add the context (the private prompt and web sources go into
``instructions``), relay to the model server's own ``/v1/responses``, sign the response object
or the stream of typed events, and account the request once, with usage from
``response.usage`` (``input_tokens``, ``output_tokens``).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import orjson
from starlette.types import Receive

from nilai.auth.nuc_policies import check_request_policies
from nilai.context.search.service import SearchOutcome
from nilai.errors import UpstreamProtocolError, rate_limit_headers
from nilai.gateway.chat.context import RESPONSES_API, RESPONSES_USAGE, RequestContext
from nilai.gateway.chat.stream import ChatStream
from nilai.gateway.pipeline import ModelPipeline, OpenedStream, SignedAnswer, signed_additions
from nilai.gateway.responses.signing import ResponseStreamSigner, sign_response
from nilai.gateway.responses.stream import RESPONSES_FRAMING, ResponseEventForwarder
from nilai.gateway.responses.validate import ValidatedResponses, validate_responses
from nilai.gateway.tools.loop import ToolRounds
from nilai.gateway.tools.responses import ResponsesToolDialect, response_as_stream
from nilai.protocol.base import json_object
from nilai.protocol.responses import ResponsesRequest


class ResponsesService(ModelPipeline):
    """Serves the Responses API: one instance per process, shared by all requests."""

    async def _check(self, request: ResponsesRequest, ctx: RequestContext) -> ValidatedResponses:
        """Describe the request in ``ctx``, then check it against policies and its model."""
        ctx.api, ctx.usage_names = RESPONSES_API, RESPONSES_USAGE
        ctx.model = request.model
        ctx.streamed = request.stream
        ctx.tools = bool(request.tools)
        ctx.web_search = request.web_search
        ctx.multimodal = request.has_image()
        check_request_policies(ctx.principal, request)
        return await self._checked(
            ctx, request.web_search, lambda: validate_responses(request, self._snapshot)
        )

    async def _with_context(
        self, validated: ValidatedResponses, ctx: RequestContext, receive: Receive | None
    ) -> tuple[ValidatedResponses, SearchOutcome | None]:
        """The context stages, in order: the private prompt, then the web search.

        Both go ahead of the client's own ``instructions``; ``receive`` lets a client that
        disconnects stop the web search (see ``ModelPipeline._search``). The prompt as sent is
        then estimated, in case its usage never comes (``ctx.settle``).
        """
        prompt = await self._private_prompt(ctx)
        if prompt is not None:
            validated = validated.with_instructions(prompt)
        conversation = validated.request.conversation()
        search = await self._search(validated.model_request, conversation, ctx, receive)
        if search is not None:
            validated = validated.with_instructions(search.message["content"])
        ctx.estimate_prompt([*validated.context, *(m.text() for m in conversation)])
        return validated, search

    async def _with_tools(
        self, validated: ValidatedResponses, ctx: RequestContext
    ) -> ToolRounds | None:
        """The tool rounds, when the client declared a server tool (else None)."""
        declared = self._server_tools(validated.request.function_names())
        if not declared:
            return None
        dialect = ResponsesToolDialect(declared)
        return await self._tool_rounds(validated.model_request, dialect, ctx, parse_response)

    async def create(
        self, request: ResponsesRequest, ctx: RequestContext, receive: Receive | None = None
    ) -> SignedAnswer:
        """Create a response (not streamed) and return the signed object.

        ``receive`` (the request's ASGI receive, its body read) lets a disconnect stop the
        context stages; see ``ModelPipeline._search``. With server tools declared, the tool
        rounds run first and the answer shows them (``tool_rounds``, signed).
        """
        with self._accounted(ctx):
            validated = await self._check(request, ctx)
            async with self._admit(validated.model_request, ctx) as decision:
                validated, search = await self._with_context(validated, ctx, receive)
                rounds = await self._with_tools(validated, ctx)
                body = await self._answer(validated.model_request, rounds, ctx, parse_response)
            validated.hide_context(body)
            usage = body.get("usage")
            ctx.add_earlier_calls(usage)
            ctx.record_usage(usage)
            added = signed_additions(search) | (rounds.signed_additions() if rounds else {})
            signed = sign_response(body, self._signer, ctx.request_sha256, added=added)
            return SignedAnswer(signed, rate_limit_headers(decision))

    async def stream(
        self, request: ResponsesRequest, ctx: RequestContext, receive: Receive | None = None
    ) -> ChatStream:
        """Open the model server's stream (failing with a real status); return the events.

        ``receive`` as for ``create``; what the returned stream holds, and when it lets go,
        as ``ModelPipeline._stream`` says. With server tools declared, the tool rounds run
        first, not streamed; then the answer streams: the model's last call if the round limit
        was reached, else the round's answer, sent as a stream (``response_as_stream``).
        """

        async def open_stream(upstream: AsyncExitStack) -> OpenedStream:
            validated = await self._check(request, ctx)
            admitted = self._admit(validated.model_request, ctx)
            decision = await upstream.enter_async_context(admitted)
            validated, search = await self._with_context(validated, ctx, receive)
            rounds = await self._with_tools(validated, ctx)
            body = await self._answer_stream(
                validated.model_request, rounds, ctx, upstream, response_as_stream
            )
            added = signed_additions(search) | (rounds.signed_additions() if rounds else {})
            signer = ResponseStreamSigner(self._signer, ctx.request_sha256, added=added)
            return OpenedStream(
                body,
                ResponseEventForwarder(signer, ctx, hide_context=validated.hide_context),
                rate_limit_headers(decision),
                framing=RESPONSES_FRAMING,
            )

        return await self._stream(ctx, open_stream)


def parse_response(body: bytes) -> dict[str, Any]:
    """Parse a non-streaming Responses API answer, insisting on an object with ``output``."""
    try:
        data = json_object(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError("The model server sent malformed JSON.") from exc
    if data is None or not isinstance(data.get("output"), list):
        raise UpstreamProtocolError("The model server sent an unexpected response.")
    return data
