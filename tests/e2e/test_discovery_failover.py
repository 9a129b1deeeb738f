"""Discovery through the real Redis: announce, fail over, recover without restarting."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import httpx
import pytest

from nilai.discovery.announcer import Announcer
from nilai.discovery.redis import RedisDiscovery
from tests.conftest import REDIS_URL
from tests.support.servers import wait_until
from tests.support.timing import finishes_within

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

BODY = {"model": "shared-model", "messages": [{"role": "user", "content": "hi"}]}
GRACE_S = 2.0
"""How long a gateway remembers a model that vanished from discovery (default 30 s)."""


class AnnouncerThread:
    """`nilai announce`'s loop for one URL, in a thread with its own event loop."""

    def __init__(self, url: str, prefix: str, ttl_s: float = 3.0) -> None:
        self.url, self.prefix, self.ttl_s = url, prefix, ttl_s
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    async def _run(self) -> None:
        from redis.asyncio import Redis

        self._stop = asyncio.Event()
        redis = Redis.from_url(REDIS_URL)
        async with httpx.AsyncClient() as http:
            discovery = RedisDiscovery(redis, self.prefix)
            await Announcer(discovery, http, self.url, ttl_s=self.ttl_s).run(self._stop)
        await redis.aclose()

    def start(self) -> AnnouncerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        wait_until(lambda: self._stop is not None)
        self._loop.call_soon_threadsafe(self._stop.set)  # type: ignore[union-attr]
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def announcers():
    running: list[AnnouncerThread] = []

    def announce(url: str, prefix: str) -> AnnouncerThread:
        running.append(AnnouncerThread(url, prefix).start())
        return running[-1]

    yield announce
    for announcer in running:
        announcer.stop()


def chat(gateway) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions", json=BODY, headers=gateway.auth, timeout=10
    )


def test_two_servers_share_traffic_and_survive_one_dying(
    start_fake, start_gateway, announcers, redis_prefix
):
    a = start_fake(name="a", models=["shared-model"])
    b = start_fake(name="b", models=["shared-model"])
    announcers(a.url, redis_prefix)
    announcers(b.url, redis_prefix)
    gateway = start_gateway(redis_url=REDIS_URL, redis_prefix=redis_prefix)
    wait_until(lambda: chat(gateway).status_code == 200)
    names = Counter(chat(gateway).json()["system_fingerprint"] for _ in range(10))
    assert names["a"] >= 3, names
    assert names["b"] >= 3, names

    b.stop()
    statuses = Counter()
    for _ in range(10):
        response = chat(gateway)
        statuses[response.status_code] += 1
        assert response.json()["system_fingerprint"] == "a"
    assert statuses == {200: 10}


def test_stopped_server_gives_503_then_recovers_after_restart(
    start_fake, start_gateway, announcers, redis_prefix
):
    fake = start_fake(name="solo", models=["shared-model"])
    first = announcers(fake.url, redis_prefix)
    gateway = start_gateway(
        redis_url=REDIS_URL, redis_prefix=redis_prefix, upstream_connect_timeout_s=30
    )
    wait_until(lambda: chat(gateway).status_code == 200)
    assert httpx.get(f"{gateway.url}/readyz").status_code == 200

    port = fake.port
    fake.stop()
    # A refused connection is answered at once, not after the (30 s) connect timeout.
    with finishes_within(10, "the 503 for a stopped model server"):
        response = chat(gateway)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["models"] == "no reachable model server"

    first.stop()
    restarted = start_fake(port=port, name="solo-again", models=["shared-model"])
    announcers(restarted.url, redis_prefix)
    wait_until(lambda: chat(gateway).status_code == 200, timeout_s=10)
    assert httpx.get(f"{gateway.url}/readyz").status_code == 200


def test_withdrawn_server_disappears_from_models(
    start_fake, start_gateway, announcers, redis_prefix
):
    fake = start_fake(models=["shared-model", "other-model"])
    announcer = announcers(fake.url, redis_prefix)
    gateway = start_gateway(
        redis_url=REDIS_URL, redis_prefix=redis_prefix, discovery_grace_s=GRACE_S
    )

    def model_ids():
        response = httpx.get(f"{gateway.url}/v1/models", headers=gateway.auth)
        return sorted(m["id"] for m in response.json()["data"])

    wait_until(lambda: model_ids() == ["other-model", "shared-model"])
    announcer.stop()
    wait_until(lambda: model_ids() == [])
    # Served a moment ago: retryable, as a server restarting or re-registering brings it back.
    response = chat(gateway)
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert "temporarily unavailable" in response.json()["error"]["message"]
    # Once the grace period has passed, the model is unknown.
    wait_until(lambda: chat(gateway).status_code == 404, timeout_s=GRACE_S + 10)
