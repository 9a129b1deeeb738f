"""A streaming response that always releases what its stream holds."""

from __future__ import annotations

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nilai.gateway.chat.service import ChatStream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ChatStreamResponse(StreamingResponse):
    """SSE response over a ``ChatStream``; closes it however the response ends.

    A generator's own ``finally`` does not run if it is never started (the client left before
    the first byte), so the release happens here, around the whole response.
    """

    def __init__(self, stream: ChatStream) -> None:
        super().__init__(
            stream.events,
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **stream.headers},
        )
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the stream, then release its resources even when cancelled."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
