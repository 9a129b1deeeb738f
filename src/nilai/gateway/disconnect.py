"""Stop work for a client that has gone: cancel a block when the client disconnects.

A non-streaming request, or a stream before its first byte, is not cancelled by the server
when its client hangs up: the handler runs to the end and its answer is dropped. That is fine
for a relay that costs the model server's time anyway, but not for work the gateway does on
the client's behalf first (a web search: a planner call, searches that count against the
provider's quota, page fetches). ``cancelled_on_disconnect`` reads the request's ASGI
``receive`` (whose body has been read, so the next message is the disconnect) and cancels the
block when it comes, through ``asyncio.timeout`` (a disconnect that lands as the block ends
counts as one: the caller must be ready for ``ClientGone`` until the block's exit is done).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from starlette.types import Receive


class ClientGone(Exception):
    """The client disconnected while the block ran; the block was cancelled."""


@contextlib.asynccontextmanager
async def cancelled_on_disconnect(receive: Receive) -> AsyncGenerator[None]:
    """Run the block, cancelling it if the client disconnects meanwhile.

    The block sees ``CancelledError`` (and accounts the request as the client's doing); the
    caller sees ``ClientGone``. Only for a request whose body is fully read: the watcher takes
    every message ``receive`` gives until the disconnect.

    Raises:
        ClientGone: The client disconnected before the block ended.
    """
    loop = asyncio.get_running_loop()
    gone = False
    try:
        async with asyncio.timeout(None) as scope:

            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                scope.reschedule(loop.time())

            watcher = asyncio.create_task(watch())
            try:
                yield
            finally:
                watcher.cancel()
                # The watcher's own cancellation comes back as a value; this task's is raised.
                await asyncio.gather(watcher, return_exceptions=True)
    except TimeoutError:
        if gone:
            raise ClientGone from None
        raise
