"""The load generator: httpx requests, closed-loop workers and bursts, timed per request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import orjson

DATA = b"data: "
DONE = b"[DONE]"
EVENT_END = b"\n\n"


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


def new_client(connections: int) -> httpx.AsyncClient:
    """An httpx client whose pool holds ``connections`` keep-alive connections."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(120.0, pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


async def plain_request(client: httpx.AsyncClient, target: Target, body: bytes) -> Outcome:
    """One non-streaming completion; ``signed`` when the body carries a signature."""
    started = time.perf_counter()
    response = await client.post(target.url, content=body, headers=target.headers)
    outcome = Outcome(latency_s=time.perf_counter() - started)
    if response.status_code != httpx.codes.OK:
        outcome.error = _error_label(response.status_code, response.content)
    outcome.signed = b'"signature"' in response.content
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


async def stream_request(client: httpx.AsyncClient, target: Target, body: bytes) -> Outcome:
    """One SSE completion: time to first content, chunk count, and the last chunk's signature."""
    started = time.perf_counter()
    outcome = Outcome()
    last, done, buffer = b"", False, b""
    async with client.stream("POST", target.url, content=body, headers=target.headers) as resp:
        if resp.status_code != httpx.codes.OK:
            outcome.error = _error_label(resp.status_code, await resp.aread())
        async for data in resp.aiter_bytes():
            buffer += data
            *events, buffer = buffer.split(EVENT_END)
            for event in events:
                if not event.startswith(DATA):
                    continue
                payload = event[len(DATA) :]
                if payload == DONE:
                    done = True
                    continue
                outcome.chunks += 1
                last = payload
                if outcome.ttft_s is None and _has_content(payload):
                    outcome.ttft_s = time.perf_counter() - started
    outcome.latency_s = time.perf_counter() - started
    if outcome.error is None and not done:
        outcome.error = "no [DONE]"
    outcome.signed = bool(last) and "signature" in orjson.loads(last)
    return outcome


async def one(client: httpx.AsyncClient, target: Target, body: bytes, stream: bool) -> Outcome:
    """One request of either kind; transport failures become an ``Outcome`` with an error."""
    send = stream_request if stream else plain_request
    started = time.perf_counter()
    try:
        return await send(client, target, body)
    except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
        return Outcome(latency_s=time.perf_counter() - started, error=type(exc).__name__)


async def closed_loop(
    client: httpx.AsyncClient,
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
    client: httpx.AsyncClient,
    target: Target,
    *,
    stream: bool,
    count: int,
    done: Callable[[Outcome], None],
) -> float:
    """``count`` requests at once, each on its own connection; returns the wall time."""
    body = request_body(stream)
    started = time.perf_counter()

    async def single() -> None:
        done(await one(client, target, body, stream))

    await asyncio.gather(*(single() for _ in range(count)))
    return time.perf_counter() - started
