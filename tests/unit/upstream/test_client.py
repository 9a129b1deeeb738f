"""The upstream chat client: aiohttp against scripted loopback servers, and its httpx twin.

Each server below answers from a script (raw bytes), so each failure the dispatcher tells apart
is produced for real: a refused connection, a full pool, a silent server, a broken body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from nilai.upstream.client import (
    AiohttpUpstream,
    ConnectFailed,
    ConnectionBroken,
    HttpxUpstream,
    PoolFull,
    ReadTimedOut,
    UpstreamClient,
)
from tests.support.servers import free_port

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_BODY = b'{"ok":true}'


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def _response(body: bytes, *, length: int | None = None, extra: bytes = b"") -> bytes:
    size = len(body) if length is None else length
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {size}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive: answer every request on the connection until the client closes it."""
    while True:
        try:
            await _read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        writer.write(_response(OK_BODY))
        await writer.drain()


class Server:
    """A loopback server running one script per connection; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


@asynccontextmanager
async def serving(script: Script) -> AsyncIterator[Server]:
    server = Server(script)
    server._server = await asyncio.start_server(server._handle, "127.0.0.1", 0)  # pyright: ignore[reportPrivateUsage]
    server.port = server._server.sockets[0].getsockname()[1]  # pyright: ignore[reportPrivateUsage]
    try:
        yield server
    finally:
        server._server.close()  # pyright: ignore[reportPrivateUsage]


@asynccontextmanager
async def client(**options: float) -> AsyncIterator[AiohttpUpstream]:
    settings = {"max_connections": 2, "connect_timeout_s": 5.0, "read_timeout_s": 5.0}
    settings.update(options)
    upstream = AiohttpUpstream(
        max_connections=int(settings["max_connections"]),
        connect_timeout_s=settings["connect_timeout_s"],
        read_timeout_s=settings["read_timeout_s"],
    )
    try:
        yield upstream
    finally:
        await upstream.aclose()


async def test_a_body_is_read_and_the_connection_is_kept_for_the_next_call():
    async with serving(answer_ok) as server, client() as upstream:
        for _ in range(3):
            response = await upstream.post(server.url, b"{}", accept="application/json")
            assert response.status == 200
            assert await response.read() == OK_BODY
    assert server.connections == 1


async def test_the_request_carries_the_body_and_the_accept_header():
    seen: list[bytes] = []

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        writer.write(_response(OK_BODY))
        await writer.drain()

    async with serving(recording) as server, client() as upstream:
        response = await upstream.post(server.url, b'{"a":1}', accept="text/event-stream")
        await response.read()
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert body == b'{"a":1}'
    assert b"accept: text/event-stream" in head.lower()
    assert b"content-type: application/json" in head.lower()


async def test_a_stream_comes_chunk_by_chunk_as_the_server_writes():
    released = asyncio.Event()

    async def two_parts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_response(b"first", length=len(b"firstsecond")))
        await writer.drain()
        await released.wait()
        writer.write(b"second")
        await writer.drain()

    async with serving(two_parts) as server, client() as upstream:
        response = await upstream.post(server.url, b"{}", accept="text/event-stream")
        chunks = response.iter_chunks()
        assert await anext(chunks) == b"first"  # before the server wrote the rest
        released.set()
        assert [chunk async for chunk in chunks] == [b"second"]
        await response.aclose()


async def test_a_refused_connection_is_connect_failed():
    async with client() as upstream:
        with pytest.raises(ConnectFailed):
            await upstream.post(
                f"http://127.0.0.1:{free_port()}/v1/chat/completions", b"{}", accept="*/*"
            )


async def test_a_full_pool_is_pool_full_and_frees_when_a_response_is_closed():
    async with (
        serving(answer_ok) as server,
        client(max_connections=1, connect_timeout_s=0.2) as upstream,
    ):
        held = await upstream.post(server.url, b"{}", accept="application/json")
        with pytest.raises(PoolFull):
            await upstream.post(server.url, b"{}", accept="application/json")
        await held.aclose()
        again = await upstream.post(server.url, b"{}", accept="application/json")
        assert await again.read() == OK_BODY


async def test_failed_calls_give_their_connection_slot_back():
    async with client(max_connections=1, connect_timeout_s=0.5) as upstream:
        closed_port = free_port()
        for _ in range(3):  # a leaked slot would make the second attempt PoolFull
            with pytest.raises(ConnectFailed):
                await upstream.post(
                    f"http://127.0.0.1:{closed_port}/v1/chat/completions", b"{}", accept="*/*"
                )


async def test_a_server_that_stops_sending_is_read_timed_out():
    async def silent_after_headers(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await _read_request(reader)
        writer.write(_response(b"", length=100))
        await writer.drain()
        await asyncio.sleep(30)

    async with serving(silent_after_headers) as server, client(read_timeout_s=0.2) as upstream:
        response = await upstream.post(server.url, b"{}", accept="text/event-stream")
        with pytest.raises(ReadTimedOut):
            async for _ in response.iter_chunks():
                pass
        await response.aclose()


async def test_a_server_that_never_answers_is_read_timed_out():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(30)

    async with serving(silent) as server, client(read_timeout_s=0.2) as upstream:
        with pytest.raises(ReadTimedOut):
            await upstream.post(server.url, b"{}", accept="application/json")


async def test_a_body_cut_short_is_connection_broken_and_the_connection_is_not_reused():
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_response(b"partial", length=100))
        await writer.drain()

    async with serving(cut_short) as server, client() as upstream:
        response = await upstream.post(server.url, b"{}", accept="application/json")
        with pytest.raises(ConnectionBroken):
            await response.read()
        response = await upstream.post(server.url, b"{}", accept="application/json")
        with pytest.raises(ConnectionBroken):
            await response.read()
    assert server.connections == 2


async def test_a_response_closed_before_its_body_arrived_closes_its_connection():
    closed = asyncio.Event()

    async def part_then_rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                closed.set()  # the client closed this connection
                return
            writer.write(_response(b"part", length=len(OK_BODY) + 4))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(OK_BODY)
            await writer.drain()

    async with serving(part_then_rest) as server, client() as upstream:
        response = await upstream.post(server.url, b"{}", accept="text/event-stream")
        await response.aclose()
        await response.aclose()  # twice is harmless
        await asyncio.wait_for(closed.wait(), timeout=10)
        response = await upstream.post(server.url, b"{}", accept="application/json")
        assert await response.read() == b"part" + OK_BODY
    assert server.connections == 2


# --- the httpx twin maps the same failures ---------------------------------------------------


def _raising(error: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    return handler


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (httpx.ConnectError("refused"), ConnectFailed),
        (httpx.ConnectTimeout("slow"), ConnectFailed),
        (httpx.PoolTimeout("busy"), PoolFull),
        (httpx.ReadTimeout("silent"), ReadTimedOut),
        (httpx.RemoteProtocolError("nonsense"), ConnectionBroken),
    ],
)
async def test_the_httpx_twin_says_each_failure_the_same_way(
    error: Exception, expected: type[Exception]
):
    async with httpx.AsyncClient(transport=httpx.MockTransport(_raising(error))) as http:
        upstream: UpstreamClient = HttpxUpstream(http)
        with pytest.raises(expected):
            await upstream.post("http://model/v1/chat/completions", b"{}", accept="*/*")


async def test_the_httpx_twin_reads_bodies_and_chunks():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept"] == "application/json"
        return httpx.Response(200, stream=httpx.ByteStream(OK_BODY))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        upstream = HttpxUpstream(http)
        response = await upstream.post("http://model/", b"{}", accept="application/json")
        assert (response.status, await response.read()) == (200, OK_BODY)
        response = await upstream.post("http://model/", b"{}", accept="application/json")
        assert b"".join([chunk async for chunk in response.iter_chunks()]) == OK_BODY
        await response.aclose()
