"""``cancelled_on_disconnect``: a client that hangs up cancels the block; nothing else does."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from nilai.gateway.disconnect import ClientGone, cancelled_on_disconnect


class Client:
    """An ASGI ``receive`` whose disconnect the test sends; counts the reads."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.reads = 0

    async def receive(self) -> Message:
        self.reads += 1
        return await self.messages.get()

    def hang_up(self) -> None:
        self.messages.put_nowait({"type": "http.disconnect"})


async def test_a_disconnect_cancels_the_block_and_raises_client_gone():
    client = Client()
    seen: list[str] = []

    async def work() -> None:
        try:
            await asyncio.Event().wait()  # work that would never end on its own
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def request() -> None:
        async with cancelled_on_disconnect(client.receive):
            asyncio.get_running_loop().call_soon(client.hang_up)
            await work()

    with pytest.raises(ClientGone):
        await request()
    assert seen == ["cancelled"]


async def test_a_block_that_ends_first_is_untouched_and_the_watcher_stops():
    client = Client()
    async with cancelled_on_disconnect(client.receive):
        await asyncio.sleep(0)
        result = 42
    assert result == 42
    client.hang_up()  # after the block: nobody reads it, nothing is cancelled
    await asyncio.sleep(0)
    assert client.reads == 1
    assert client.messages.qsize() == 1


async def test_other_messages_are_read_past_and_errors_of_the_block_pass_through():
    client = Client()
    client.messages.put_nowait({"type": "http.request", "body": b"", "more_body": False})

    async def failing(error: Exception) -> None:
        async with cancelled_on_disconnect(client.receive):
            await asyncio.sleep(0)
            raise error

    with pytest.raises(TimeoutError, match="own"):
        await failing(TimeoutError("the block's own"))
    with pytest.raises(ValueError, match="inside"):
        await failing(ValueError("inside"))


async def test_a_cancellation_from_outside_stays_a_cancellation():
    client = Client()
    started = asyncio.Event()

    async def request() -> None:
        async with cancelled_on_disconnect(client.receive):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(request())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
