"""Exception handlers: every error leaves an HTTP app in the OpenAI shape (see ``nilai.errors``).

Shared by the gateway and the built-in model server, so both answer alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nilai.errors import (
    InvalidRequest,
    NilaiError,
    ValidationFailed,
    error_body,
    to_error_body,
)

logger = logging.getLogger(__name__)

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that render every failure as an OpenAI error."""
    app.add_exception_handler(NilaiError, _nilai_error)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(RequestValidationError, _validation_error)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(HTTPException, _http_error)  # pyright: ignore[reportArgumentType]
    # Call before adding other middleware: this one must be the innermost.
    app.add_middleware(InternalErrors)


async def _nilai_error(_request: Request, exc: NilaiError) -> JSONResponse:
    if exc.status >= HTTPStatus.INTERNAL_SERVER_ERROR and exc.log_each:
        logger.warning("request failed: %s (%d)", type(exc).__name__, exc.status)
    return JSONResponse(to_error_body(exc), status_code=exc.status, headers=exc.headers)


def validation_error(errors: Sequence[Any]) -> NilaiError:
    """The client error for pydantic's list of problems with a request body."""
    # Any: pydantic's error dicts.
    first: dict[str, Any] = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.")
    param = _param(first.get("loc", ()))
    message = str(first.get("msg", "Invalid request."))
    text = f"{param}: {message}" if param else message
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return ValidationFailed(text, param=param, code="invalid_value")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _nilai_error(request, validation_error(exc.errors()))


def _param(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` → ``"messages.0.role"``.

    Union tags (``"<items>"``: which member of a union was validated) are the model's own
    bookkeeping, not a field the client wrote, and are left out.
    """
    parts = [str(part) for part in loc if part != "body" and not _is_union_tag(part)]
    return ".".join(parts) or None


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and part.startswith("<") and part.endswith(">")


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    error_type = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
    message = exc.detail or "Request failed."
    if exc.status_code == HTTPStatus.NOT_FOUND:
        message = "No such route; see the API reference for the available paths."
    return JSONResponse(
        error_body(message, error_type), status_code=exc.status_code, headers=exc.headers
    )


class InternalErrors:
    """Turn an unexpected exception into the OpenAI-shaped 500, never a trace.

    Added as the innermost middleware rather than as an ``Exception`` handler: Starlette runs
    that handler outside every middleware, so its 500 would miss their headers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            raise
        except Exception:
            logger.exception("unexpected error")
            if started:
                raise  # too late for a status: the server closes the connection
            body = error_body(
                "The server had an internal error.", "server_error", code="internal_error"
            )
            await JSONResponse(body, status_code=500)(scope, receive, send)
