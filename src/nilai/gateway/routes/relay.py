"""What every model route does with a request: read, parse, hand to its service, answer.

The body is read and hashed first (the signature binds the answer to it), parsed within the
body limits, and a request refused or cancelled while being parsed is accounted too. The
service's ``receive`` lets a client that hangs up while the gateway works for it before the
model answers (a web search, NilRAG) stop that work; the service accounts the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from fastapi import Request, Response
from starlette.types import Receive

from nilai.auth.base import Principal
from nilai.gateway.chat.context import CLIENT_CLOSED, RequestContext
from nilai.gateway.chat.parse import BodyLimits, check_content_type
from nilai.gateway.chat.stream import ChatStream, ChatStreamResponse
from nilai.gateway.disconnect import ClientGone
from nilai.gateway.pipeline import ModelPipeline, SignedAnswer
from nilai.settings import NilaiSettings


class Streamable(Protocol):
    """A parsed request that says whether it wants a stream."""

    @property
    def stream(self) -> bool:
        """Whether the answer is streamed."""
        ...


type Serve[R] = Callable[[R, RequestContext, Receive], Awaitable[SignedAnswer]]
type Open[R] = Callable[[R, RequestContext, Receive], Awaitable[ChatStream]]


async def relay_request[R: Streamable](
    request: Request,
    principal: Principal,
    request_id: str,
    settings: NilaiSettings,
    *,
    api: str,
    parse: Callable[[bytes, BodyLimits], Awaitable[R]],
    service: ModelPipeline,
    whole: Serve[R],
    stream: Open[R],
) -> Response:
    """Serve one model request of ``api``: a signed JSON answer, or its signed stream."""
    raw = await request.body()
    ctx = RequestContext.begin(request_id, principal, raw, api=api)
    limits = BodyLimits(settings.max_messages, settings.max_json_items)
    try:
        check_content_type(request.headers.get("content-type"))
        body = await parse(raw, limits)
    except BaseException as exc:  # refused, or cancelled while measured: accounted either way
        ctx.fail(exc)
        service.account(ctx)
        raise
    try:
        if body.stream:
            return ChatStreamResponse(await stream(body, ctx, request.receive))
        result = await whole(body, ctx, request.receive)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)  # to nobody: accounted already
    return Response(result.body, media_type="application/json", headers=result.headers)
