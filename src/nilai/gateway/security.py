"""Pure ASGI middleware for hostile clients: body size limit and security headers.

Pure ASGI (not ``BaseHTTPMiddleware``) so a streamed body is bounded while it is read and a
streamed response keeps flowing; errors surface as ``NilaiError`` and get the OpenAI shape.
"""

from __future__ import annotations

import orjson
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nilai.errors import PayloadTooLarge, to_error_body

DOCS_PATHS = ("/docs", "/redoc")
# The API serves JSON and SSE only: nothing may be loaded, framed or run.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
# The interactive docs load their scripts and styles from jsDelivr.
DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src https://fonts.gstatic.com; worker-src blob:; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` with 413: by ``Content-Length``, and while reading."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_too_large(scope, receive, send, self.max_bytes)
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(_too_large_message(self.max_bytes))
            return message

        await self.app(scope, bounded_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large_message(max_bytes: int) -> str:
    return f"The request body is larger than the limit of {max_bytes} bytes."


async def _send_too_large(scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
    del scope, receive  # refused before anything is read
    body = orjson.dumps(to_error_body(PayloadTooLarge(_too_large_message(max_bytes))))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Add the security headers to every response, errors included."""

    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = str(scope.get("path", "")).startswith(DOCS_PATHS)
        authenticated = any(name == b"authorization" for name, _ in scope["headers"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"
                headers["Content-Security-Policy"] = DOCS_CSP if docs else API_CSP
                if self.hsts:
                    headers["Strict-Transport-Security"] = "max-age=63072000; includeSubDomains"
                if authenticated:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)
