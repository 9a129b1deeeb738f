"""``POST /v1/responses``: hands the request to the Responses service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from nilai.gateway.chat.context import RESPONSES_API
from nilai.gateway.chat.parse import parse_responses_request
from nilai.gateway.deps import PrincipalDep, RequestIdDep, ServicesDep
from nilai.gateway.routes.relay import relay_request
from nilai.protocol.base import inline_json_schema
from nilai.protocol.errors import error_responses
from nilai.protocol.responses import ResponsesRequest

router = APIRouter(tags=["responses"])

# The body is parsed in the handler (straight from bytes, and after authentication), so its
# schema is declared here for the OpenAPI document.
_BODY_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline_json_schema(ResponsesRequest)}},
    }
}

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The signed response object, or with stream=true its signed stream of "
        "typed events (each 'event: <type>' and 'data: {...}', the last response.completed).",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                }
            },
        },
    },
    **error_responses(400, 401, 404, 413, 415, 422, 429, 500, 502, 503, 504),
}


@router.post(
    "/v1/responses",
    response_model=None,
    responses=_RESPONSES,
    openapi_extra=_BODY_SCHEMA,
)
async def create_response(
    request: Request, principal: PrincipalDep, services: ServicesDep, request_id: RequestIdDep
) -> Response:
    """Relay a Responses API request and return the answer signed, whole or as a stream."""
    return await relay_request(
        request,
        principal,
        request_id,
        services.settings,
        api=RESPONSES_API,
        parse=parse_responses_request,
        service=services.responses,
        whole=services.responses.create,
        stream=services.responses.stream,
    )
