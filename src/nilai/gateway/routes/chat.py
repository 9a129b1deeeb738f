"""``POST /v1/chat/completions``: hands the request to the chat service."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from nilai.gateway.chat.context import RequestContext
from nilai.gateway.deps import PrincipalDep, RequestIdDep, ServicesDep
from nilai.protocol.chat import ChatCompletionRequest

router = APIRouter(tags=["chat"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    request_id: RequestIdDep,
) -> Response:
    """Relay a chat completion and return it signed, whole or as a stream."""
    chat = services.chat.validate(body)
    ctx = RequestContext.begin(request_id, principal, await request.body())
    if body.stream:
        events = await services.chat.stream(chat, ctx)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    return Response(await services.chat.complete(chat, ctx), media_type="application/json")
