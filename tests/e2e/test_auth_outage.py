"""Stored API keys while the accounts database is away: 503 with Retry-After, never 500.

A real gateway reaches a private PostgreSQL database through a TCP proxy that the test cuts
(every connection dropped, new ones refused). Keys the gateway has not cached cannot be
checked: they get 503 ``accounts_unavailable`` with ``Retry-After``, under concurrent clients
too, and the outage is logged once. Once the proxy is back the same keys get 200, and the end
of the outage is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from nilai.store.sql import SqlStore
from tests.support.servers import wait_until
from tests.support.stores import (
    PG_HOST,
    PG_PORT,
    create_tenant,
    pg_url,
    with_store,
)
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

KEYS = 8
CLIENTS = 10
REQUESTS_IN_OUTAGE = 40
OUTAGE_LINE = "accounts database unavailable"
RECOVERY_LINE = "accounts database available again"


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy(PG_HOST, PG_PORT) as running:
        yield running


def make_keys(url: str, count: int) -> list[str]:
    """Stored keys of ``count`` tenants, written straight to the database (not via the proxy)."""

    async def create(store: SqlStore) -> list[str]:
        return [(await create_tenant(store, f"tenant-{n}"))[2] for n in range(count)]

    return with_store(url, create)


def chat(client: httpx.Client, key: str) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-model", "messages": [{"role": "user", "content": "ping"}]},
    )


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


def test_uncached_stored_keys_get_503_with_retry_after_while_the_database_is_away(
    pg_database: str, proxy: TcpProxy, start_fake, start_gateway, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    upstream = start_fake()
    gateway = start_gateway(
        database_url=pg_url(pg_database, port=proxy.port), upstream_urls=[upstream.url]
    )
    cached, *uncached = make_keys(pg_url(pg_database), KEYS)

    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert chat(client, cached).status_code == 200
        proxy.cut()

        with ThreadPoolExecutor(CLIENTS) as pool:
            keys = [uncached[n % len(uncached)] for n in range(REQUESTS_IN_OUTAGE)]
            answers = list(pool.map(lambda key: chat(client, key), keys))
        assert [answer.status_code for answer in answers] == [503] * REQUESTS_IN_OUTAGE
        for answer in answers:
            assert int(answer.headers["Retry-After"]) >= 1
            error = answer.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "accounts_unavailable")
        # a key cached before the outage works until its entry expires, then gets 503 as well
        assert chat(client, cached).status_code in {200, 503}
        assert len(log_lines(caplog, OUTAGE_LINE)) == 1

        proxy.restore()
        wait_until(lambda: chat(client, uncached[0]).status_code == 200, timeout_s=15)
        assert [chat(client, key).status_code for key in [cached, *uncached]] == [200] * KEYS

    assert len(log_lines(caplog, OUTAGE_LINE)) == 1
    assert len(log_lines(caplog, RECOVERY_LINE)) == 1
    for key in [cached, *uncached]:
        assert all(key[:18] not in record.getMessage() for record in caplog.records)
