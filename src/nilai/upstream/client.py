"""Chat calls to model servers: a small client Protocol, with aiohttp behind it.

Every chat request crosses this client twice (the request out, the answer or stream back), so
its cost is the gateway's floor: aiohttp's C parser and plain asyncio transport cost about a
twentieth of httpx's CPU per call on our machine (docs/PERFORMANCE.md). ``HttpxUpstream`` is the
twin that tests drive through ``httpx.MockTransport``; both behave the same to their callers.

Failures come out as backend-neutral errors, each saying what the dispatcher may do next:

- ``ConnectFailed``: no connection could be made (refused, unreachable, too slow to connect).
  The server never saw the request, so another server of the model may take it.
- ``PoolFull``: every connection this process may open is busy for longer than the connect
  timeout; the gateway's own limit (``NILAI_UPSTREAM_MAX_CONNECTIONS``), not the server's fault.
- ``ReadTimedOut``: the server did not answer, or stopped sending, within the read timeout.
- ``ConnectionBroken``: the connection broke, or what came back was not HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import aiohttp
import httpx

KEEPALIVE_S = 4.0
"""Idle upstream connections are closed after this long: below the 5 s keep-alive of
uvicorn-based model servers (vLLM's included), so an idle connection is dropped here before the
server closes it under a request."""


class UpstreamCallError(Exception):
    """A chat call to a model server failed before or while its answer was read."""


class ConnectFailed(UpstreamCallError):
    """No connection could be made; the server never received the request."""


class PoolFull(UpstreamCallError):
    """Every connection this process may open stayed busy for the whole connect timeout."""


class ReadTimedOut(UpstreamCallError):
    """The server did not answer, or stopped sending, within the read timeout."""


class ConnectionBroken(UpstreamCallError):
    """The connection broke, or the answer was not valid HTTP."""


class UpstreamResponse(Protocol):
    """A model server's answer: the status is known, the body not read yet."""

    @property
    def status(self) -> int:
        """The HTTP status code."""
        ...

    async def read(self) -> bytes:
        """The whole body; then the connection goes back to the pool.

        Raises:
            ReadTimedOut: The body did not arrive in time.
            ConnectionBroken: The connection broke.
        """
        ...

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one chunk per network read.

        The caller bounds how long each read may take (the stream's first-token and idle
        limits); the client's own read timeout may not apply to these reads.

        Raises:
            ReadTimedOut: A read did not finish in time.
            ConnectionBroken: The connection broke.
        """
        ...

    async def aclose(self) -> None:
        """Give the connection back (or close it, if the body was not read to the end)."""
        ...


class UpstreamClient(Protocol):
    """Posts JSON to model servers over pooled connections."""

    async def post(self, url: str, body: bytes, *, accept: str) -> UpstreamResponse:
        """POST ``body`` (JSON) and return once the status and headers are in.

        Raises:
            ConnectFailed, PoolFull, ReadTimedOut, ConnectionBroken: see the module docstring.
        """
        ...

    async def aclose(self) -> None:
        """Close every pooled connection."""
        ...


# --- aiohttp ---------------------------------------------------------------------------------


class AiohttpUpstream:
    """The production client: one aiohttp session, connections bounded by a semaphore.

    The bound is kept here rather than in aiohttp's connector, whose wait for a free connection
    shares its time limit (and its error) with connecting: a full pool must say ``PoolFull``
    (answer 503, eject nothing), a server that does not accept connections ``ConnectFailed``.
    Build it inside the running event loop (``open_upstream``).
    """

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._pool_timeout_s = connect_timeout_s
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, keepalive_timeout=keepalive_s, enable_cleanup_closed=False
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            trust_env=False,
            raise_for_status=False,
        )

    async def post(self, url: str, body: bytes, *, accept: str) -> UpstreamResponse:
        """POST ``body``; see ``UpstreamClient.post``."""
        try:
            async with asyncio.timeout(self._pool_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolFull("every upstream connection is busy") from None
        try:
            response = await self._session.post(
                url,
                data=body,
                headers={"Content-Type": "application/json", "Accept": accept},
                allow_redirects=False,
            )
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
                raise ConnectFailed(str(exc)) from exc
            raise _neutral_error(exc) from exc
        return _AiohttpResponse(response, self._slots.release)

    async def aclose(self) -> None:
        """Close the session and its connections."""
        await self._session.close()


def _neutral_error(exc: BaseException) -> BaseException:
    """``exc`` as an ``UpstreamCallError`` when it is aiohttp's or a socket's; else itself."""
    if isinstance(exc, TimeoutError):  # aiohttp's read timeouts are TimeoutErrors too
        return ReadTimedOut(str(exc) or type(exc).__name__)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ConnectionBroken(str(exc) or type(exc).__name__)
    return exc


_AIOHTTP_READ_ERRORS = (TimeoutError, OSError, aiohttp.ClientError)


class _AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse, release: Callable[[], None]) -> None:
        self._response = response
        self._release_slot: Callable[[], None] | None = release

    @property
    def status(self) -> int:
        return self._response.status

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except _AIOHTTP_READ_ERRORS as exc:
            raise _neutral_error(exc) from exc
        finally:
            await self.aclose()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        # The caller keeps each read's limit with one timer per stream; aiohttp's own read
        # timeout would cancel and set a timer for every chunk, that is, for every token.
        connection = self._response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = None
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except _AIOHTTP_READ_ERRORS as exc:
            raise _neutral_error(exc) from exc

    async def aclose(self) -> None:
        if self._release_slot is None:
            return
        release, self._release_slot = self._release_slot, None
        try:
            if self._response.content.at_eof():
                self._response.release()
            else:
                self._response.close()  # unread body: the connection cannot be reused
        finally:
            release()


async def open_upstream(
    *, max_connections: int, connect_timeout_s: float, read_timeout_s: float
) -> AiohttpUpstream:
    """The production client, built in the running event loop."""
    return AiohttpUpstream(
        max_connections=max_connections,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
    )


# --- httpx (tests' twin) ---------------------------------------------------------------------


class HttpxUpstream:
    """The same client over an ``httpx.AsyncClient``: tests drive it with ``MockTransport``."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def post(self, url: str, body: bytes, *, accept: str) -> UpstreamResponse:
        """POST ``body``; see ``UpstreamClient.post``."""
        request = self._client.build_request(
            "POST",
            url,
            content=body,
            headers={"Content-Type": "application/json", "Accept": accept},
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.PoolTimeout as exc:
            raise PoolFull(str(exc)) from exc
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ConnectFailed(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise _neutral_httpx_error(exc) from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        """Close the wrapped client."""
        await self._client.aclose()


def _neutral_httpx_error(exc: Exception) -> UpstreamCallError:
    if isinstance(exc, httpx.TimeoutException):
        return ReadTimedOut(str(exc) or type(exc).__name__)
    return ConnectionBroken(str(exc) or type(exc).__name__)


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.HTTPError as exc:
            raise _neutral_httpx_error(exc) from exc
        finally:
            await self._response.aclose()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise _neutral_httpx_error(exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()
