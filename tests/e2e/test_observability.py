"""Metrics and request ids as an operator sees them: /metrics after traffic, logs, query logs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from nilai.store.sql import SqlStore
from nilai.store.tables import QueryLogRow
from tests.conftest import TEST_API_KEY, FakeHandle, GatewayHandle
from tests.support.replicas import Replica, wait_serving
from tests.support.servers import wait_until
from tests.support.stores import with_store

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SECRET_PROMPT = "my-secret-prompt-4242"
MESSAGES = [{"role": "user", "content": SECRET_PROMPT}]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of ``/metrics``, keyed by name and sorted labels."""
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_traffic_and_hold_no_request_content(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake(tokens=4)
    gateway = start_gateway(upstream_urls=[fake.url], rate_limit_minute=6)
    client = gateway.client()
    for _ in range(3):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    for _ in range(2):
        stream = client.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert list(stream)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"no-such-{SECRET_PROMPT}", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):  # the 7th request of the minute
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    bad = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer wrong-{SECRET_PROMPT}"},
        json={"model": "fake-model", "messages": MESSAGES},
    )
    assert bad.status_code == 401
    assert httpx.get(f"{gateway.url}/{SECRET_PROMPT}/path").status_code == 404

    samples = scrape(gateway.url)
    chat = "nilai_chat_duration_seconds_count"
    assert value(samples, chat, model="fake-model", stream="plain", status="200") == 3
    assert value(samples, chat, model="fake-model", stream="stream", status="200") == 2
    assert value(samples, chat, model="other", stream="plain", status="404") == 1
    assert value(samples, chat, model="fake-model", stream="plain", status="429") == 1
    assert value(samples, "nilai_chat_time_to_first_token_seconds_count", model="fake-model") == 2
    upstream = "nilai_upstream_duration_seconds_count"
    assert value(samples, upstream, model="fake-model", stream="plain") == 3
    assert value(samples, upstream, model="fake-model", stream="stream") == 2
    assert value(samples, "nilai_rate_limit_rejections_total", limit="minute") == 1
    completion = value(samples, "nilai_tokens_total", model="fake-model", kind="completion")
    prompt = value(samples, "nilai_tokens_total", model="fake-model", kind="prompt")
    assert completion > 0
    assert prompt > 0
    http = "nilai_http_request_duration_seconds_count"
    route = "/v1/chat/completions"
    assert value(samples, http, route=route, method="POST", status="200") == 5
    assert value(samples, http, route=route, method="POST", status="401") == 1
    assert value(samples, http, route="unmatched", method="GET", status="404") == 1
    assert value(samples, "nilai_chat_streams_in_flight") == 0
    # The scrape itself is the one request in flight.
    assert value(samples, "nilai_http_requests_in_flight") == 1
    assert ("nilai_usage_queue_depth", ()) in samples
    assert value(samples, "nilai_usage_dropped_rows") == 0

    labels = {v for _, pairs in samples for _, v in pairs}
    for forbidden in (SECRET_PROMPT, TEST_API_KEY, "wrong-"):
        assert not [label for label in labels if forbidden in label], forbidden


def test_upstream_errors_are_counted_by_kind(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], endpoint_eject_s=60)
    fake.stop()
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers=gateway.auth,
        json={"model": "fake-model", "messages": MESSAGES},
    )
    assert response.status_code == 503
    samples = scrape(gateway.url)
    assert value(samples, "nilai_upstream_errors_total", kind="unavailable") == 1


def test_metrics_refuse_addresses_outside_the_allowlist(start_gateway):
    gateway = start_gateway(metrics_allow=["10.0.0.0/8"])
    response = httpx.get(f"{gateway.url}/metrics")
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert "NILAI_METRICS_ALLOW" in response.json()["error"]["message"]


def test_metrics_can_be_switched_off(start_gateway):
    gateway = start_gateway(metrics_enabled=False)
    assert httpx.get(f"{gateway.url}/metrics").status_code == 404


# --- X-Forwarded-For: believed only from the proxies in NILAI_FORWARDED_ALLOW_IPS ---------------
# These run real `nilai api` processes: which headers uvicorn believes is set in run_server.

SCRAPERS = "192.0.2.0/24"  # a documentation network standing for the Prometheus hosts
SCRAPER = "192.0.2.10"
OUTSIDER = "203.0.113.5"


def started(replica: Replica) -> Replica:
    def healthy() -> bool:
        if replica.process.poll() is not None:
            raise AssertionError(f"nilai api exited:\n{replica.tail()}")
        try:
            return httpx.get(f"{replica.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout_s=20)
    return replica


def scrape_status(url: str, forwarded_for: str, *, source: str = "127.0.0.1") -> int:
    """The status of GET /metrics from ``source`` (a loopback address) with X-Forwarded-For."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=5) as client:
        response = client.get(f"{url}/metrics", headers={"X-Forwarded-For": forwarded_for})
    return response.status_code


def test_metrics_do_not_believe_x_forwarded_for_without_configured_proxies(
    start_replica: Callable[..., Replica],
):
    """A proxy on 127.0.0.1 that passes the header through cannot let a client pick its address.

    uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise; the gateway tells it
    to believe no one by default, so the client here is 127.0.0.1, outside the allowlist.
    """
    gateway = started(start_replica("no-proxies", NILAI_METRICS_ALLOW=SCRAPERS))
    assert scrape_status(gateway.url, SCRAPER) == 403
    assert scrape_status(gateway.url, f"{OUTSIDER}, {SCRAPER}") == 403


def test_metrics_believe_x_forwarded_for_from_configured_proxies_only(
    start_replica: Callable[..., Replica],
):
    gateway = started(
        start_replica(
            "proxied",
            NILAI_METRICS_ALLOW=f"{SCRAPERS},127.0.0.1/32",
            NILAI_FORWARDED_ALLOW_IPS="127.0.0.1",
        )
    )
    # The proxy (127.0.0.1) relays a scrape from the allowlisted network.
    assert scrape_status(gateway.url, SCRAPER) == 200
    # A client forged the scraper's (or loopback's) address; the proxy appended the client's
    # own: the last address that is not a trusted proxy is the client.
    assert scrape_status(gateway.url, f"{SCRAPER}, {OUTSIDER}") == 403
    assert scrape_status(gateway.url, f"127.0.0.1, {OUTSIDER}") == 403
    # A client that is not a configured proxy is itself, whatever it claims.
    assert scrape_status(gateway.url, "127.0.0.1", source="127.0.0.2") == 403
    assert scrape_status(gateway.url, SCRAPER, source="127.0.0.2") == 403


def test_request_id_reaches_the_response_the_log_and_the_query_log(
    start_fake: Callable[..., FakeHandle], start_replica: Callable[..., Replica], tmp_path: Path
):
    fake = start_fake()
    replica = start_replica(
        "api", NILAI_UPSTREAM_URLS=fake.url, NILAI_LOG_FORMAT="json", NILAI_LOG_LEVEL="info"
    )
    wait_serving(replica)
    headers = {"Authorization": f"Bearer {TEST_API_KEY}", "X-Request-ID": "trace-abc-123"}
    body: dict[str, Any] = {"model": "fake-model", "messages": MESSAGES}
    response = httpx.post(f"{replica.url}/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-abc-123"
    created = httpx.post(
        f"{replica.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": headers["Authorization"]},
    )
    created_id = created.headers["x-request-id"]
    assert len(created_id) == 32

    def chat_lines() -> list[dict[str, Any]]:
        lines = [
            json.loads(line) for line in replica.log.read_text().splitlines() if line[:1] == "{"
        ]
        return [line for line in lines if line["message"].startswith("chat ")]

    wait_until(lambda: len(chat_lines()) == 2, timeout_s=10)
    assert [line["request_id"] for line in chat_lines()] == ["trace-abc-123", created_id]
    assert SECRET_PROMPT not in replica.log.read_text()

    async def request_ids(store: SqlStore) -> list[str]:
        async with store.session() as session:
            rows = (await session.execute(select(QueryLogRow.request_id))).scalars()
            return sorted(rows)

    url = f"sqlite+aiosqlite:///{tmp_path / 'api' / 'nilai.db'}"
    wait_until(lambda: len(with_store(url, request_ids)) == 2, timeout_s=10)
    assert with_store(url, request_ids) == sorted(["trace-abc-123", created_id])
