"""/readyz needs no credentials, so however often anyone calls it, it must cost the same.

It probes no model server (the routing snapshot's background probes do, at their own
cadence), so it cannot take a slow but working server out of rotation; and its database and
Redis pings run at most once a second, whoever asks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.conftest import FakeHandle, GatewayHandle
from tests.support.private_redis import PrivateRedis
from tests.support.servers import wait_until

pytestmark = pytest.mark.e2e

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
SLOW_MODEL_LIST_S = 1.3
"""Longer than a background probe waits (1 s), shorter than an announcer waits (2 s)."""
READYZ_CALLS = 1000
CALLERS = 20
LONG_LEASE_S = 300.0
"""The gateway's own announcer lists the models at start-up, then not for minutes: every
later model-list request the fake sees is a probe."""


def _chat(client: httpx.Client, gateway: GatewayHandle) -> int:
    url = f"{gateway.url}/v1/chat/completions"
    return client.post(url, json=BODY, headers=gateway.auth).status_code


def _hammer_readyz(gateway: GatewayHandle, between_rounds: Callable[[httpx.Client], None]) -> float:
    """``READYZ_CALLS`` anonymous calls, ``CALLERS`` at a time; return how long they took."""

    def readyz(client: httpx.Client) -> httpx.Response:
        return client.get(f"{gateway.url}/readyz")

    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(httpx.Client(timeout=10)) for _ in range(CALLERS)]
        pool = stack.enter_context(ThreadPoolExecutor(CALLERS))
        started = time.monotonic()
        for _ in range(READYZ_CALLS // CALLERS):
            answers = list(pool.map(readyz, clients))
            between_rounds(clients[0])
            assert [answer.status_code for answer in answers] == [200] * CALLERS, answers[0].text
        return time.monotonic() - started


def test_a_thousand_anonymous_readyz_calls_probe_no_model_server_and_leave_chat_working(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake(models_delay_s=SLOW_MODEL_LIST_S)
    gateway = start_gateway(upstream_urls=[fake.url], discovery_ttl_s=LONG_LEASE_S)
    stats = fake.state.stats
    wait_until(lambda: stats.model_list_requests >= 2)  # the announcer's start-up listings
    before = stats.model_list_requests

    def chat_still_works(client: httpx.Client) -> None:
        assert _chat(client, gateway) == 200

    elapsed = _hammer_readyz(gateway, chat_still_works)
    probes = stats.model_list_requests - before
    rounds = elapsed / gateway.settings.endpoint_probe_s + 1
    print(f"\n{READYZ_CALLS} /readyz calls in {elapsed:.1f} s; {probes} model-list probes")
    assert probes <= rounds  # the background cadence, and nothing for the callers


def test_readyz_pings_redis_at_most_once_a_second_however_often_it_is_called(
    private_redis: PrivateRedis,
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    from nilai.gateway.readiness import MAX_AGE_S

    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], redis_url=private_redis.url)
    observer = redis.Redis.from_url(private_redis.url)

    def pings() -> int:
        stats = observer.info("commandstats").get("cmdstat_ping", {})
        return int(stats.get("calls", 0))

    try:
        before = pings()
        elapsed = _hammer_readyz(gateway, lambda _client: None)
        sent = pings() - before
    finally:
        observer.close()
    runs = elapsed / MAX_AGE_S + 1
    print(f"\n{READYZ_CALLS} /readyz calls in {elapsed:.1f} s; Redis saw {sent} PINGs")
    # Each run is one PING; the pool's own health check may PING a connection idle for a second
    # before handing it out, at most once more per run.
    assert sent <= 2 * runs


def test_a_model_server_that_stops_leaves_readiness_without_any_request(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(
        upstream_urls=[fake.url], discovery_ttl_s=LONG_LEASE_S, endpoint_probe_s=0.5
    )
    assert httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200
    fake.stop()  # its registration stays for minutes: only the background probe can tell

    def not_ready() -> httpx.Response | None:
        response = httpx.get(f"{gateway.url}/readyz", timeout=5)
        return response if response.status_code == 503 else None

    checks = wait_until(not_ready).json()["checks"]
    assert checks["models"] == "no reachable model server"
