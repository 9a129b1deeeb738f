"""CORS for the gateway: Starlette's middleware, with refusals in the OpenAI error shape."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from nilai.errors import InvalidRequest, to_error_body


class OpenAIErrorCORS(CORSMiddleware):
    """Starlette's CORS middleware, answering a refused preflight in the OpenAI error shape.

    Starlette answers preflights itself, before any route or handler, with a plain-text 400;
    clients and MIGRATION.md expect every error as ``{"error": {...}}``.
    """

    def preflight_response(self, request_headers: Headers) -> Response:
        """The preflight answer; a refusal says what was disallowed as an OpenAI error."""
        response = super().preflight_response(request_headers)
        if response.status_code < HTTPStatus.BAD_REQUEST:
            return response
        reason = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        error = InvalidRequest(f"{reason}.", code="cors_disallowed")
        kept = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-length", "content-type")
        }
        return JSONResponse(to_error_body(error), status_code=response.status_code, headers=kept)
