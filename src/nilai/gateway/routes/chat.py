"""``POST /v1/chat/completions``: hands the request to the chat service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from nilai.gateway.chat.context import CHAT_API
from nilai.gateway.chat.parse import parse_chat_request
from nilai.gateway.deps import PrincipalDep, RequestIdDep, ServicesDep
from nilai.gateway.routes.relay import relay_request
from nilai.protocol.base import inline_json_schema
from nilai.protocol.chat import ChatCompletionRequest
from nilai.protocol.errors import error_responses

router = APIRouter(tags=["chat"])

# The body is parsed in the handler (straight from bytes, and after authentication), so its
# schema is declared here for the OpenAPI document.
_BODY_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline_json_schema(ChatCompletionRequest)}},
    }
}


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The signed completion, or with stream=true its signed SSE stream.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            # Each event's data is one JSON chunk, then the literal [DONE].
            "text/event-stream": {
                "schema": {"type": "object", "properties": {"data": {"type": "string"}}}
            },
        },
    },
    **error_responses(400, 401, 404, 413, 415, 422, 429, 500, 502, 503, 504),
}


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses=_RESPONSES,
    openapi_extra=_BODY_SCHEMA,
)
async def chat_completions(
    request: Request, principal: PrincipalDep, services: ServicesDep, request_id: RequestIdDep
) -> Response:
    """Relay a chat completion and return it signed, whole or as a stream."""
    return await relay_request(
        request,
        principal,
        request_id,
        services.settings,
        api=CHAT_API,
        parse=parse_chat_request,
        service=services.chat,
        whole=services.chat.complete,
        stream=services.chat.stream,
    )
