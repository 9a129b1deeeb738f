"""A database outage of several seconds loses no query log (DESIGN §4).

A TCP proxy sits between the gateway and PostgreSQL. Under steady traffic the proxy drops
every connection and refuses new ones for 11 s; chat keeps answering (settings keys need no
database), the usage sink holds the rows, and once the database is back every request has its
row and is counted in the totals.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import openai
import pytest
from sqlalchemy import func, select

from nilai.store.sql import SqlStore, make_engine
from nilai.store.tables import QueryLogRow, UsageTotalRow
from tests.integration.conftest import (
    PG_HOST,
    PG_PORT,
    pg_url,
    run_sync,
)
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

TRAFFIC_S = 16.0
OUTAGE_START_S = 2.0
OUTAGE_S = 11.0
REQUEST_EVERY_S = 0.1
DRAIN_TIMEOUT_S = 15.0


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy(PG_HOST, PG_PORT) as running:
        yield running


class Traffic(threading.Thread):
    """Chat completions at a steady pace until ``duration_s`` has passed."""

    def __init__(self, client: openai.OpenAI, duration_s: float) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.duration_s = duration_s
        self.sent = 0
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []
        self.started_at = 0.0

    def run(self) -> None:
        self.started_at = time.monotonic()
        next_at = self.started_at
        while (now := time.monotonic()) - self.started_at < self.duration_s:
            self.sent += 1
            try:
                self.client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "ping"}]
                )
            except Exception as exc:
                self.failed.append((now - self.started_at, repr(exc)))
            else:
                self.ok.append(now - self.started_at)
            next_at += REQUEST_EVERY_S
            time.sleep(max(0.0, next_at - time.monotonic()))


async def _count(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    try:
        async with SqlStore(engine).session() as session:
            rows = (
                await session.execute(select(func.count()).select_from(QueryLogRow))
            ).scalar_one()
            queries = (
                await session.execute(select(func.coalesce(func.sum(UsageTotalRow.queries), 0)))
            ).scalar_one()
            return rows, int(queries)
    finally:
        await engine.dispose()


def test_no_query_log_is_lost_in_a_database_outage(
    pg_database: str, proxy: TcpProxy, start_fake, start_gateway
):
    upstream = start_fake()
    gateway = start_gateway(
        database_url=pg_url(pg_database, port=proxy.port),
        upstream_urls=[upstream.url],
        usage_flush_interval_s=0.2,
    )
    sink = gateway.thread.app.state.services.usage_sink
    assert proxy.connections >= 1  # the gateway migrated and holds pooled connections

    with gateway.client(timeout=5) as client:
        traffic = Traffic(client, TRAFFIC_S)
        traffic.start()
        time.sleep(OUTAGE_START_S)
        proxy.cut()
        time.sleep(OUTAGE_S / 2)
        written_mid_outage = sink.written
        time.sleep(OUTAGE_S / 2)
        depth_at_end_of_outage = sink.depth
        written_at_end_of_outage = sink.written
        proxy.restore()
        traffic.join(timeout=TRAFFIC_S + 10)
        assert not traffic.is_alive()

    # chat answered throughout, the outage included
    assert traffic.failed == []
    assert len(traffic.ok) == traffic.sent
    in_outage = [t for t in traffic.ok if OUTAGE_START_S + 1 < t < OUTAGE_START_S + OUTAGE_S]
    assert len(in_outage) >= 0.8 * (OUTAGE_S - 1) / REQUEST_EVERY_S
    # nothing reached the database while it was away; the sink held the rows
    assert written_at_end_of_outage == written_mid_outage
    assert depth_at_end_of_outage >= 0.8 * OUTAGE_S / REQUEST_EVERY_S

    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while sink.depth:
        assert time.monotonic() < deadline, f"{sink.depth} rows still queued"
        time.sleep(0.1)
    assert sink.dropped == 0
    assert sink.written == traffic.sent

    rows, queries = run_sync(_count(pg_url(pg_database)))
    assert rows == traffic.sent
    assert queries == traffic.sent
    assert proxy.cuts == 1
