"""The gateway's Redis client after Redis went away under its pooled connections (issue 13.5).

A Redis restart behind a load balancer, a failover or a vanished host leaves the client's pooled
sockets dead without the client being told: the next command written to one meets a reset. A
proxy on loopback plays that part: ``kill_silently`` drops its side of every relayed connection
and answers the next bytes a client sends on one with a TCP reset. The client must notice,
reconnect and send the command again, so no request fails and none is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis

from nilai.auth.base import Principal
from nilai.errors import LimitsUnavailable
from nilai.gateway.lifespan import make_admission
from nilai.limits.policy import Admission
from nilai.settings import NilaiSettings
from nilai.state.redis import make_redis
from tests.conftest import REDIS_URL, TEST_API_KEY
from tests.support.private_redis import PrivateRedis
from tests.support.servers import bind_loopback, free_port

pytestmark = pytest.mark.integration

CONCURRENT = 8


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    dead: bool = False
    threads: list[threading.Thread] = field(default_factory=list[threading.Thread])


class SilentlyDyingProxy:
    """Relays loopback connections to Redis; can make every one die without telling the client."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = bind_loopback()
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self.resets = 0
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> SilentlyDyingProxy:
        self._acceptor.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in (pair.client, pair.upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    def kill_silently(self) -> int:
        """Drop the Redis side of every connection; the client side stays open, unaware."""
        with self._lock:
            pairs = [pair for pair in self._pairs if not pair.dead]
            for pair in pairs:
                pair.dead = True
        for pair in pairs:
            with contextlib.suppress(OSError):
                pair.upstream.shutdown(socket.SHUT_RDWR)
        return len(pairs)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self._target, timeout=2)
            upstream.settimeout(None)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
            for target in (self._to_redis, self._to_client):
                thread = threading.Thread(target=target, args=(pair,), daemon=True)
                thread.start()

    def _to_redis(self, pair: _Pair) -> None:
        with contextlib.suppress(OSError):
            while data := pair.client.recv(65536):
                if pair.dead:
                    # What the client meets on a connection whose server is gone: a reset.
                    linger = struct.pack("ii", 1, 0)
                    pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    pair.client.close()
                    with self._lock:
                        self.resets += 1
                    return
                pair.upstream.sendall(data)

    def _to_client(self, pair: _Pair) -> None:
        with contextlib.suppress(OSError):
            while data := pair.upstream.recv(65536):
                pair.client.sendall(data)
        # A dead connection says nothing to the client; a live one that Redis closed is closed.
        if not pair.dead:
            with contextlib.suppress(OSError):
                pair.client.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy() -> Iterator[SilentlyDyingProxy]:
    host, port = REDIS_URL.removeprefix("redis://").split("/")[0].split(":")
    with SilentlyDyingProxy((host, int(port))) as running:
        yield running


@dataclass
class Gateway:
    redis: Redis
    admission: Admission


@pytest.fixture
async def gateway(proxy: SilentlyDyingProxy, redis_prefix: str) -> AsyncIterator[Gateway]:
    """The gateway's Redis client and admission, reaching Redis through the proxy."""
    settings = NilaiSettings(
        api_keys=[TEST_API_KEY],
        redis_url=f"redis://127.0.0.1:{proxy.port}/0",  # pyright: ignore[reportArgumentType]
        redis_prefix=redis_prefix,
        rate_limit_minute=1000,
        rate_limit_hour=0,
        rate_limit_day=0,
    )
    redis = make_redis(settings)
    assert redis is not None
    admission = make_admission(settings, redis)
    try:
        yield Gateway(redis, admission)
    finally:
        await admission.aclose()
        await redis.aclose()


async def _admit_and_hold_a_slot(admission: Admission, principal: Principal) -> None:
    await admission.admit(principal)
    async with admission.model_slot("m"):
        await asyncio.sleep(0.01)  # keeps the connections of concurrent requests apart


async def _minute_count(prefix: str, principal: Principal) -> int:
    direct = Redis.from_url(REDIS_URL)
    try:
        return int(await direct.zcard(f"{prefix}{{acct:{principal.account_id}}}:minute"))
    finally:
        await direct.aclose()


async def test_dead_pooled_redis_connections_are_replaced_without_failing_requests(
    gateway: Gateway,
    proxy: SilentlyDyingProxy,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
):
    principal = Principal(f"acct-{uuid.uuid4().hex[:8]}", "api_key")
    # Several requests at once fill the pool with several connections.
    await asyncio.gather(
        *(_admit_and_hold_a_slot(gateway.admission, principal) for _ in range(CONCURRENT))
    )
    assert proxy.kill_silently() >= 2

    # Right away, on connections used a moment ago, and again at once: every one is dead.
    with caplog.at_level(logging.WARNING):
        await asyncio.gather(
            *(_admit_and_hold_a_slot(gateway.admission, principal) for _ in range(CONCURRENT))
        )
        for _ in range(CONCURRENT):
            await _admit_and_hold_a_slot(gateway.admission, principal)

    assert proxy.resets >= 2  # the dead connections were met, and replaced
    assert "rate limiter unavailable" not in caplog.text
    # Each request counted once, although some of their commands were sent twice.
    assert await _minute_count(redis_prefix, principal) == 3 * CONCURRENT


# --- an outage in the log: its cause once when it starts, once when it ends ------------------


def _admission_on(url: str, *, fail_open: bool = False) -> tuple[Redis, Admission]:
    settings = NilaiSettings(
        api_keys=[TEST_API_KEY],
        redis_url=url,  # pyright: ignore[reportArgumentType]
        rate_limit_minute=1000,
        rate_limit_fail_open=fail_open,
    )
    redis = make_redis(settings)
    assert redis is not None
    return redis, make_admission(settings, redis)


async def _refused(admission: Admission, principal: Principal) -> bool:
    try:
        await admission.admit(principal)
        async with admission.model_slot("m"):
            return False
    except LimitsUnavailable:
        return True


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


@pytest.mark.parametrize("fail_open", [False, True])
async def test_rate_limiter_outage_is_logged_once_with_its_cause_and_no_secret(
    caplog: pytest.LogCaptureFixture, fail_open: bool
):
    port = free_port()
    password = "s3cret-redis-password"  # pragma: allowlist secret
    redis, admission = _admission_on(f"redis://:{password}@127.0.0.1:{port}/0", fail_open=fail_open)
    principal = Principal("acct-outage", "api_key")
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(5):
                assert await _refused(admission, principal) is not fail_open
    finally:
        await admission.aclose()
        await redis.aclose()
    (line,) = _lines(caplog, "rate limiter unavailable")
    assert f"ConnectionError: Error 111 connecting to 127.0.0.1:{port}." in line
    assert "Connection refused" in line  # the OS error, whichever way the message puts it
    consequence = "admitted without checking" if fail_open else "refused with 503"
    assert consequence in line
    assert password not in caplog.text
    assert "rate limits not checked" not in caplog.text  # no line per request either


async def test_rate_limiter_outage_end_is_logged_once_when_redis_answers_again(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
):
    redis, admission = _admission_on(private_redis.url)
    principal = Principal("acct-outage-end", "api_key")
    try:
        assert not await _refused(admission, principal)
        private_redis.stop()
        with caplog.at_level(logging.INFO):
            for _ in range(5):
                assert await _refused(admission, principal)
            private_redis.start()  # the same port, empty
            for _ in range(5):
                assert not await _refused(admission, principal)
    finally:
        await admission.aclose()
        await redis.aclose()
    assert len(_lines(caplog, "rate limiter unavailable")) == 1
    (back,) = _lines(caplog, "rate limiter available again")
    assert "(5 failed attempts)" in back
