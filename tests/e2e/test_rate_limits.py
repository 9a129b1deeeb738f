"""Rate and concurrency limits as clients see them: through gateways, and across replicas.

In-process gateways run over both backends (process memory, and this machine's Redis under a
unique prefix); replicas are real ``nilai api`` processes sharing one Redis; outages stop a
private ``redis-server`` started here, never the shared one.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.conftest import REDIS_URL, TEST_API_KEY, FakeHandle, GatewayHandle
from tests.support.private_redis import PrivateRedis
from tests.support.replicas import Replica, wait_serving
from tests.support.servers import wait_until
from tests.support.timing import finishes_within

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

NILAI = str(Path(sys.executable).parent / "nilai")
MESSAGES = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
ERROR_FIELDS = {"message", "type", "param", "code"}


def chat(url: str, *, stream: bool = False, timeout: float = 10) -> httpx.Response:
    """One chat request, read to the end."""
    body = {"model": "fake-model", "messages": MESSAGES, "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=timeout)


@contextlib.contextmanager
def open_stream(client: httpx.Client, url: str) -> Iterator[Iterator[bytes]]:
    """A streamed chat held open after its first bytes arrived; yields the rest of it.

    The iterator must stay referenced: dropping a started ``iter_raw`` closes the connection.
    """
    body = {"model": "fake-model", "messages": MESSAGES, "stream": True}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = resp.iter_raw()
        assert next(events).startswith(b"data: ")
        yield events


def assert_rate_limited(response: httpx.Response, limit_text: str) -> int:
    """An OpenAI-shaped 429 naming the limit; returns its Retry-After."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert limit_text in error["message"]
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert int(retry_after) >= 1
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert response.headers["X-RateLimit-Limit"].isdigit()
    assert response.headers["X-RateLimit-Reset"].isdigit()
    return int(retry_after)


@pytest.fixture(params=["memory", "redis"])
def limit_store(request: pytest.FixtureRequest, redis_prefix: str) -> dict[str, Any]:
    """Gateway settings for the limit store: this process, or the shared Redis."""
    if request.param == "memory":
        return {}
    return {"redis_url": REDIS_URL, "redis_prefix": redis_prefix}


# --- in-process gateways, both backends ---------------------------------------------------


def test_minute_limit_admits_five_then_429(
    limit_store: dict[str, Any],  # first: its Redis keys are deleted after the gateway stops
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], rate_limit_minute=5, **limit_store)
    for i in range(5):
        response = chat(gateway.url, stream=i % 2 == 1)
        assert response.status_code == 200, response.text
        assert response.headers["X-RateLimit-Limit"] == "5"
        assert response.headers["X-RateLimit-Remaining"] == str(4 - i)
        assert 0 <= int(response.headers["X-RateLimit-Reset"]) <= 60
        if i % 2:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.text.rstrip().endswith("data: [DONE]")

    refused = chat(gateway.url)
    retry_after = assert_rate_limited(refused, "5 requests per minute for this account")
    assert refused.headers["X-RateLimit-Limit"] == "5"
    # When the first request leaves the window (whole seconds, rounded up): it has counted
    # down since it was admitted, so never the whole minute again.
    assert retry_after <= 60
    assert 1 <= int(refused.headers["X-RateLimit-Reset"]) <= 60
    assert_rate_limited(chat(gateway.url, stream=True), "per minute")

    client = gateway.client()
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert raised.value.status_code == 429
    assert "requests per minute" in raised.value.message
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)


def test_sdk_raises_at_once_on_a_minute_limit_instead_of_sleeping_out_retry_after(
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], rate_limit_minute=1)
    assert chat(gateway.url).status_code == 200
    refused = chat(gateway.url)
    assert int(refused.headers["Retry-After"]) > 5
    assert refused.headers["x-should-retry"] == "false"

    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key=TEST_API_KEY, max_retries=2, http_client=http
    )
    with http, pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert len(sent) == 1  # no retry, so no sleep of up to a minute before it
    assert "Retry after" in raised.value.message


def test_model_concurrency_refuses_the_third_until_a_stream_ends(
    limit_store: dict[str, Any],  # first: its Redis keys are deleted after the gateway stops
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    fake = start_fake(tokens=50, token_delay_s=0.05)
    gateway = start_gateway(upstream_urls=[fake.url], model_concurrency=2, **limit_store)
    with httpx.Client(timeout=10) as client, contextlib.ExitStack() as streams:
        first = streams.enter_context(open_stream(client, gateway.url))
        streams.enter_context(open_stream(client, gateway.url))

        refused = chat(gateway.url)
        assert_rate_limited(refused, "2 concurrent requests for this model")
        assert "x-should-retry" not in refused.headers  # a 1 s wait: SDKs may retry it
        assert_rate_limited(chat(gateway.url, stream=True), "concurrent requests")
        with pytest.raises(openai.RateLimitError):
            gateway.client().chat.completions.create(
                model="fake-model", messages=MESSAGES, stream=True
            )

        stats = fake.state.stats
        assert (stats.streams_started, stats.cancelled) == (2, 0)  # both still streaming

        rest = b"".join(first)  # the first stream runs to its end
        assert rest.rstrip().endswith(b"data: [DONE]")
        # The slot is returned as the response finishes; allow the server that moment.
        admitted = wait_until(
            lambda: (r := chat(gateway.url)).status_code == 200 and r, timeout_s=3
        )
        assert admitted.headers["content-type"].startswith("application/json")


def test_closed_loop_clients_at_the_concurrency_limit_are_never_refused(
    limit_store: dict[str, Any],  # first: its Redis keys are deleted after the gateway stops
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    """A client that never has more than N requests open is never refused by a limit of N:
    the slot is free before the client reads the end of its stream and sends the next one."""
    clients, rounds = 6, 25
    fake = start_fake(tokens=3)
    gateway = start_gateway(upstream_urls=[fake.url], model_concurrency=clients, **limit_store)

    def closed_loop(_: int) -> Counter[int]:
        statuses: Counter[int] = Counter()
        with httpx.Client(timeout=10) as client:
            for i in range(rounds):
                body = {"model": "fake-model", "messages": MESSAGES, "stream": i % 4 != 3}
                response = client.post(
                    f"{gateway.url}/v1/chat/completions", json=body, headers=AUTH
                )
                statuses[response.status_code] += 1
        return statuses

    with ThreadPoolExecutor(clients) as pool:
        statuses = sum(pool.map(closed_loop, range(clients)), Counter[int]())
    assert statuses == {200: clients * rounds}


def test_two_replicas_share_the_minute_limit(
    start_fake: Callable[..., FakeHandle], start_replica: Callable[..., Replica]
):
    fake = start_fake()
    env = {"NILAI_UPSTREAM_URLS": fake.url, "NILAI_RATE_LIMIT_MINUTE": "20"}
    replicas = [start_replica("a", **env), start_replica("b", **env)]
    wait_serving(*replicas)
    targets = [replicas[i % 2].url for i in range(60)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(chat, targets))

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 20, 429: 40}, statuses
    for response in responses:
        if response.status_code == 429:
            # Until the oldest admitted request leaves the shared window: within the minute.
            retry_after = assert_rate_limited(response, "20 requests per minute")
            assert 1 <= retry_after <= 60
        else:
            assert response.headers["X-RateLimit-Limit"] == "20"
    remaining = sorted(int(r.headers["X-RateLimit-Remaining"]) for r in responses if r.is_success)
    assert remaining == list(range(20))  # every admitted request saw the shared count


def test_killed_replica_frees_its_slots_within_30s(
    start_fake: Callable[..., FakeHandle], start_replica: Callable[..., Replica]
):
    fake = start_fake(tokens=400, token_delay_s=0.05)  # streams of 20 s
    env = {
        "NILAI_UPSTREAM_URLS": fake.url,
        "NILAI_MODEL_CONCURRENCY": "3",
        "NILAI_CONCURRENCY_LEASE_TTL_S": "5",
    }
    doomed, survivor = start_replica("doomed", **env), start_replica("survivor", **env)
    wait_serving(doomed, survivor)
    with httpx.Client(timeout=30) as client, contextlib.ExitStack() as streams:
        for _ in range(3):
            streams.enter_context(open_stream(client, doomed.url))
        assert_rate_limited(chat(doomed.url), "3 concurrent requests for this model")

        doomed.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        doomed.process.wait(timeout=5)
        # Its slots are still held: nothing released them.
        retry_after = assert_rate_limited(chat(survivor.url), "3 concurrent requests")
        assert retry_after <= 6  # the earliest lease ends within its 5 s lifetime

        # The wait's limit is the claim: free again within 30 s of the kill.
        wait_until(lambda: chat(survivor.url).status_code == 200, timeout_s=30, interval_s=0.1)
        print(f"\nslots of the SIGKILLed replica free after {time.monotonic() - killed:.2f} s")
        with contextlib.suppress(httpx.HTTPError):
            streams.close()

    # All three expired, not just one: three streams fit again, within the same 30 s. (The
    # leases were taken one after another, so the last may end a moment after the first.)
    def three_streams_fit() -> bool:
        with httpx.Client(timeout=30) as client, contextlib.ExitStack() as streams:
            try:
                for _ in range(3):
                    streams.enter_context(open_stream(client, survivor.url))
            except AssertionError:  # refused: a lease of the killed replica is still running
                return False
            return True

    wait_until(three_streams_fit, timeout_s=max(1.0, 30 - (time.monotonic() - killed)))


# --- Redis outages -------------------------------------------------------------------------


def test_redis_outage_fails_closed_and_service_returns_with_redis(
    private_redis: PrivateRedis,  # first: it stops after the gateway
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    fake = start_fake()
    gateway = start_gateway(
        upstream_urls=[fake.url], redis_url=private_redis.url, rate_limit_minute=1000
    )
    assert chat(gateway.url).status_code == 200

    private_redis.stop()
    with finishes_within(10, "the 503 without Redis"):
        refused = chat(gateway.url)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert set(error) == ERROR_FIELDS
    assert error["type"] == "service_unavailable"
    assert error["code"] == "rate_limiter_unavailable"
    assert "Rate limiting is unavailable" in error["message"]
    assert "Redis" in error["message"]
    assert refused.headers["Retry-After"] == "1"
    assert chat(gateway.url, stream=True).status_code == 503
    ready = httpx.get(f"{gateway.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("unreachable")

    private_redis.start()  # the same port; the gateway is not restarted
    restarted = time.monotonic()
    wait_until(lambda: chat(gateway.url).status_code == 200, timeout_s=15, interval_s=0.2)
    print(f"\nserving again {time.monotonic() - restarted:.2f} s after Redis restarted")
    # The new Redis starts empty, so discovery may lose the model for a moment until the
    # gateway announces its upstream again; once it has, everything is served.
    fresh = redis.Redis.from_url(private_redis.url)
    try:
        wait_until(lambda: fresh.exists("nilai:discovery:index"), timeout_s=10)
    finally:
        fresh.close()
    wait_until(lambda: chat(gateway.url).status_code == 200, timeout_s=5, interval_s=0.2)
    assert chat(gateway.url, stream=True).status_code == 200
    wait_until(
        lambda: httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200, timeout_s=5
    )


def test_redis_outage_fail_open_keeps_serving(
    private_redis: PrivateRedis,
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    fake = start_fake(tokens=20, token_delay_s=0.05)
    gateway = start_gateway(
        upstream_urls=[fake.url],
        redis_url=private_redis.url,
        rate_limit_minute=3,
        model_concurrency=1,
        rate_limit_fail_open=True,
    )
    assert chat(gateway.url).status_code == 200
    private_redis.stop()
    for stream in (False, True, False, True, False):  # more than the minute allows
        response = chat(gateway.url, stream=stream)
        assert response.status_code == 200, response.text
        assert "X-RateLimit-Limit" not in response.headers  # nothing was counted
    with httpx.Client(timeout=10) as client, contextlib.ExitStack() as streams:
        for _ in range(2):  # more than the model's one slot: no slot is taken either
            streams.enter_context(open_stream(client, gateway.url))
        assert chat(gateway.url).status_code == 200
    assert httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 503
