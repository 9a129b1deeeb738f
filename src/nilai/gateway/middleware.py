"""Pure ASGI middleware: request ids, and the server's own ``send`` kept for streams."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nilai.logging import request_id_var

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Use the client's ``X-Request-ID`` if it is sane, else a new one; return it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            return text if _VALID_ID.match(text) else None
    return None


SERVER_SEND = "nilai.server_send"
"""The scope key under which ``KeepServerSend`` leaves the server's ``send``."""


class KeepServerSend:
    """Leave the server's own ``send`` in the scope, for a stream to write its chunks with.

    A chat stream sends one body message per token, and through the middleware stack each one
    passes a ``send`` wrapper per layer (ours and Starlette's, eight in all), each of which only
    ever acts on the response start: that cost about a sixth of a relayed token's CPU. So a
    stream sends its start and its final message through the stack, where every layer sees the
    status, the headers and the end, and the chunks between them straight to the server.
    Installed outermost. ``START_ONLY_MIDDLEWARE`` in ``nilai.gateway.app`` names the layers
    that allows, and a test fails when a layer outside it is added.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection, with the server's ``send`` in the scope."""
        if scope["type"] == "http":
            scope[SERVER_SEND] = send
        await self.app(scope, receive, send)
