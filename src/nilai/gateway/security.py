"""Pure ASGI middleware for hostile clients: body size limit and security headers.

Pure ASGI (not ``BaseHTTPMiddleware``) so a streamed body is bounded while it is read and a
streamed response keeps flowing; errors surface as ``NilaiError`` and get the OpenAI shape.
"""

from __future__ import annotations

import orjson
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
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
    """Refuse bodies over ``max_bytes`` with 413: by ``Content-Length``, and while reading.

    A client that is still sending when the server closes the connection often sees a reset
    rather than the 413 (asyncio clients always do: their failed write drops the unread
    answer). So a body up to ``drain_bytes`` over the limit is read and discarded before the
    connection closes; it costs no more than a body at the limit, and the server's body read
    timeout bounds how long it may take. A larger one is cut off at once, and so is one whose
    client waits for ``100 Continue`` (it sends nothing until told to).
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, drain_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = max_bytes if drain_bytes is None else drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        drain = not _expects_continue(scope)
        if declared is not None and declared > self.max_bytes:
            drain = drain and declared <= self.max_bytes + self.drain_bytes
            await _send_too_large(send, self.max_bytes, more_body=drain)
            if drain:
                await discard_body(receive, declared)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        received = 0
        refused = False
        gone = False

        async def bounded_receive() -> Message:
            nonlocal received, refused, gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    allowance = self.max_bytes + self.drain_bytes - received
                    if drain and message.get("more_body", False) and allowance >= 0:
                        await discard_body(receive, allowance)
                    raise PayloadTooLarge(_too_large_message(self.max_bytes))
            return message

        async def closing_send(message: Message) -> None:
            if refused and message["type"] == "http.response.start":
                # The rest of an over-limit body is not read: end the connection after the 413.
                MutableHeaders(scope=message)["Connection"] = "close"
            await send(message)

        try:
            await self.app(scope, bounded_receive, closing_send)
        except ClientDisconnect:
            # The client left (or the server cut it off for sending too slowly) while its body
            # was being read: nobody to answer. Unhandled, uvicorn logs a traceback for each.
            if not gone:
                raise


async def discard_body(receive: Receive, max_bytes: int) -> bool:
    """Read the rest of the request body and drop it; False if more than ``max_bytes`` came.

    Stops early when the client disconnects (True: nothing is left to read).
    """
    discarded = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return True
        discarded += len(message.get("body", b""))
        if discarded > max_bytes:
            return False
        if not message.get("more_body", False):
            return True


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _expects_continue(scope: Scope) -> bool:
    return any(
        name == b"expect" and value.lower() == b"100-continue" for name, value in scope["headers"]
    )


def _too_large_message(max_bytes: int) -> str:
    return f"The request body is larger than the limit of {max_bytes} bytes."


async def _send_too_large(send: Send, max_bytes: int, *, more_body: bool) -> None:
    """Send the 413; with ``more_body`` the caller ends the response after draining the body.

    The answer is complete either way (its Content-Length is met), so a client that reads
    while it sends gets it at once.
    """
    body = orjson.dumps(to_error_body(PayloadTooLarge(_too_large_message(max_bytes))))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": more_body})


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
