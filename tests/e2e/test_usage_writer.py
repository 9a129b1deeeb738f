"""The query-log writer against a real gateway on PostgreSQL: a row the database refuses is
dropped and counted while every other request keeps its row, and a writer that cannot write is
reported by /readyz until it can again, losing nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import asyncpg
import httpx
import pytest
from sqlalchemy import select

from nilai.store.base import QueryLog
from nilai.store.sql import SqlStore
from nilai.store.tables import QueryLogRow
from nilai.usage.sink import UsageSink
from tests.conftest import FakeHandle, GatewayHandle
from tests.e2e.test_observability import scrape, value
from tests.support.servers import wait_until
from tests.support.stores import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    pg_url,
    run_sync,
    with_store,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MESSAGES = [{"role": "user", "content": "hello there"}]
POISONED = "poison-"


def _stored_request_ids(url: str) -> set[str]:
    async def read(store: SqlStore) -> set[str]:
        async with store.session() as session:
            return set((await session.execute(select(QueryLogRow.request_id))).scalars())

    return with_store(url, read)


def _chat(gateway: GatewayHandle, request_id: str, model: str = "fake-model") -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={**gateway.auth, "X-Request-ID": request_id},
        json={"model": model, "messages": MESSAGES},
        timeout=10,
    )


def _set_read_only(database: str, read_only: bool) -> None:
    """Make new sessions of ``database`` read-only (or not) and end the current ones, as a
    failover to a replica does: SELECT still answers, every write fails."""

    async def run() -> None:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
        try:
            setting = "on" if read_only else "off"
            await conn.execute(
                f'ALTER DATABASE "{database}" SET default_transaction_read_only = {setting}'
            )
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
        finally:
            await conn.close()

    run_sync(run())


def test_a_query_log_postgresql_refuses_does_not_stop_accounting_for_later_requests(
    pg_database: str,
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
    monkeypatch: pytest.MonkeyPatch,
):
    # Whatever the source of a bad value (a client's model id, an upstream's token count), the
    # writer must survive it: rows of requests with these ids get a NUL in their model.
    put = UsageSink.put
    queued: list[str] = []

    def put_poisoned(self: UsageSink, log: QueryLog) -> None:
        if log.request_id.startswith(POISONED):
            log = dataclasses.replace(log, model="bad\x00model")
        queued.append(log.request_id)
        put(self, log)

    monkeypatch.setattr(UsageSink, "put", put_poisoned)
    url = pg_url(pg_database)
    fake = start_fake()
    gateway = start_gateway(database_url=url, upstream_urls=[fake.url], usage_flush_interval_s=0.05)

    refused = _chat(gateway, "nul-model", model="bad\x00model")
    assert 400 <= refused.status_code < 500, refused.text
    assert _chat(gateway, f"{POISONED}1").status_code == 200
    later = [f"later-{i}" for i in range(10)]
    for request_id in later:
        assert _chat(gateway, request_id).status_code == 200

    wait_until(lambda: set(later) <= _stored_request_ids(url))
    sink: UsageSink = gateway.thread.app.state.services.usage_sink
    wait_until(lambda: sink.depth == 0)
    stored = _stored_request_ids(url)
    assert f"{POISONED}1" not in stored
    samples = scrape(gateway.url)
    rejected = value(samples, "nilai_usage_dropped_rows", reason="rejected")
    # the injected row, and the NUL-model request's own row if it was queued and refused
    assert rejected == 1 + ("nul-model" in queued and "nul-model" not in stored)
    assert value(samples, "nilai_usage_dropped_rows", reason="queue_full") == 0
    usage = httpx.get(f"{gateway.url}/v1/usage", headers=gateway.auth, timeout=5).json()
    assert usage["queries"] == len(stored)  # dropped rows are not counted, now or later
    ready = httpx.get(f"{gateway.url}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["usage_log"] == f"ok (0 queued, {int(rejected)} dropped)"


def test_readyz_reports_a_stuck_usage_writer_until_it_writes_again_losing_nothing(
    pg_database: str,
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    url = pg_url(pg_database)
    fake = start_fake()
    gateway = start_gateway(
        database_url=url,
        upstream_urls=[fake.url],
        usage_flush_interval_s=0.05,
        usage_stall_s=1.0,
    )
    assert httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200

    _set_read_only(pg_database, True)
    sent = [f"while-read-only-{i}" for i in range(3)]
    for request_id in sent:
        assert _chat(gateway, request_id).status_code == 200

    def stuck() -> httpx.Response | None:
        response = httpx.get(f"{gateway.url}/readyz", timeout=5)
        return response if response.status_code == 503 else None

    response = wait_until(stuck)
    checks = response.json()["checks"]
    assert checks["database"] == "ok"  # reachable: only the writer shows the trouble
    assert checks["usage_log"].startswith("degraded (nothing written for ")
    assert checks["usage_log"].endswith("; 3 queued, 0 dropped)")
    assert value(scrape(gateway.url), "nilai_usage_writer_stalled_seconds") > 1.0

    _set_read_only(pg_database, False)
    wait_until(lambda: set(sent) <= _stored_request_ids(url), timeout_s=20)
    wait_until(lambda: httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200)
    samples = scrape(gateway.url)
    assert value(samples, "nilai_usage_dropped_rows", reason="rejected") == 0
    assert value(samples, "nilai_usage_dropped_rows", reason="queue_full") == 0
