"""The load generator: aiohttp requests, closed-loop workers and bursts, timed per request.

aiohttp's client (C HTTP parser) costs about a tenth of a millisecond of CPU per request here,
against 2-4 ms for httpx: on a two-core machine the load generator shares a core with the fake
model server, so a cheap client is what lets the direct rows measure the fake, not the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import aiohttp
import orjson

DATA = b"data: "
DONE = b"[DONE]"
EVENT_END = b"\n\n"
OK = HTTPStatus.OK
READ_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 60.0  # thousands of connections at once may wait on a full listen backlog
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError)


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: the gateway or the fake model server directly."""

    name: str
    url: str
    headers: dict[str, str]


@dataclass(slots=True)
class Outcome:
    """What one request did."""

    latency_s: float = 0.0
    ttft_s: float | None = None
    chunks: int = 0
    reads: int = 0
    """Socket reads that delivered a piece of the body (a stream's tokens, one per read or not)."""
    signed: bool = False
    error: str | None = None


def request_body(stream: bool) -> bytes:
    """The chat request every scenario sends (streams ask for the usage chunk)."""
    body: dict[str, object] = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def new_client() -> aiohttp.ClientSession:
    """An aiohttp session with no cap on connections (each concurrent request opens its own).

    Created inside the running event loop, as aiohttp requires.
    """
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


def _headers(target: Target) -> dict[str, str]:
    return {**target.headers, "Content-Type": "application/json"}


async def plain_request(client: aiohttp.ClientSession, target: Target, body: bytes) -> Outcome:
    """One non-streaming completion; ``signed`` when the body carries a signature."""
    started = time.perf_counter()
    async with client.post(target.url, data=body, headers=_headers(target)) as response:
        content = await response.read()
    outcome = Outcome(latency_s=time.perf_counter() - started, reads=1)
    if response.status != OK:
        outcome.error = _error_label(response.status, content)
    outcome.signed = b'"signature"' in content
    return outcome


def _error_label(status: int, body: bytes) -> str:
    """``HTTP <status>`` and the error's ``code`` when the body is an OpenAI-style error."""
    try:
        error = orjson.loads(body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        error = {}
    code = error.get("code") if isinstance(error, dict) else None
    return f"HTTP {status} {code}" if code else f"HTTP {status}"


def _has_content(payload: bytes) -> bool:
    """Whether a stream chunk carries a non-empty ``delta.content`` (parsed only if it may)."""
    if b'"content"' not in payload:
        return False
    chunk = orjson.loads(payload)
    return any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices", []))


async def stream_request(client: aiohttp.ClientSession, target: Target, body: bytes) -> Outcome:
    """One SSE completion: time to first content, chunk count, and the last chunk's signature."""
    started = time.perf_counter()
    outcome = Outcome()
    last, done, buffer = b"", False, b""
    async with client.post(target.url, data=body, headers=_headers(target)) as response:
        if response.status != OK:
            outcome.error = _error_label(response.status, await response.read())
        # iter_any: whatever one socket read delivered, so ``reads`` counts reads, not events.
        async for data in response.content.iter_any():
            outcome.reads += 1
            buffer += data
            *events, buffer = buffer.split(EVENT_END)
            for event in events:
                if not event.startswith(DATA):
                    continue
                payload = event[len(DATA) :]
                if payload == DONE:
                    done = True
                    continue
                if payload.startswith(b'{"error"') and outcome.error is None:
                    # An in-band error ends a stream that had started: not a success.
                    error = orjson.loads(payload)["error"]
                    outcome.error = f"in-band {error.get('code') or error.get('type')}"
                outcome.chunks += 1
                last = payload
                if outcome.ttft_s is None and _has_content(payload):
                    outcome.ttft_s = time.perf_counter() - started
    outcome.latency_s = time.perf_counter() - started
    if outcome.error is None and not done:
        outcome.error = "no [DONE]"
    outcome.signed = bool(last) and "signature" in orjson.loads(last)
    return outcome


async def one(client: aiohttp.ClientSession, target: Target, body: bytes, stream: bool) -> Outcome:
    """One request of either kind; transport failures become an ``Outcome`` with an error."""
    send = stream_request if stream else plain_request
    started = time.perf_counter()
    try:
        return await send(client, target, body)
    except TRANSPORT_ERRORS as exc:
        return Outcome(latency_s=time.perf_counter() - started, error=type(exc).__name__)


async def closed_loop(
    client: aiohttp.ClientSession,
    target: Target,
    *,
    stream: bool,
    concurrency: int,
    duration_s: float,
    done: Callable[[Outcome], None],
) -> float:
    """``concurrency`` workers send back to back for ``duration_s``; returns the wall time.

    A request started before the deadline is allowed to finish and is counted, so the wall time
    covers every request reported through ``done``.
    """
    body = request_body(stream)
    started = time.perf_counter()
    deadline = started + duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            done(await one(client, target, body, stream))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def burst(
    client: aiohttp.ClientSession,
    target: Target,
    *,
    stream: bool,
    count: int,
    done: Callable[[Outcome], None],
    spread_s: float = 0.0,
) -> float:
    """``count`` requests, each on its own connection; returns the wall time.

    All at once, or started evenly over ``spread_s`` (each request's latency is from its start).
    """
    body = request_body(stream)
    started = time.perf_counter()
    interval = spread_s / count if count else 0.0

    async def single(index: int) -> None:
        if interval:
            await asyncio.sleep(started + index * interval - time.perf_counter())
        done(await one(client, target, body, stream))

    await asyncio.gather(*(single(index) for index in range(count)))
    return time.perf_counter() - started
