"""A database outage of several seconds loses no query log (DESIGN §4).

A TCP proxy sits between the gateway and PostgreSQL. Under steady traffic the proxy drops
every connection and refuses new ones for 11 s; chat keeps answering (settings keys need no
database), the usage sink holds the rows, and once the database is back every request has its
row and is counted in the totals.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import openai
import pytest
from sqlalchemy import func, select

from nilai.store.sql import SqlStore, make_engine
from nilai.store.tables import QueryLogRow, UsageTotalRow
from tests.support.servers import wait_until
from tests.support.stores import (
    PG_HOST,
    PG_PORT,
    pg_url,
    run_sync,
)
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REQUEST_EVERY_S = 0.1
BEFORE_OUTAGE = 20  # chats answered before the database goes away
DURING_OUTAGE = 100  # and while it is away (about 10 s at this pace), half of them, then all
AFTER_OUTAGE = 20  # and once it is back
DRAIN_TIMEOUT_S = 15.0


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy(PG_HOST, PG_PORT) as running:
        yield running


class Traffic(threading.Thread):
    """Chat completions one after another, a pause between them, until ``stop()``."""

    def __init__(self, client: openai.OpenAI) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.sent = 0
        self.ok = 0
        self.failed: list[str] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            self.sent += 1
            try:
                self.client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "ping"}]
                )
            except Exception as exc:
                self.failed.append(repr(exc))
            else:
                self.ok += 1
            self._stopping.wait(REQUEST_EVERY_S)

    def stop(self) -> None:
        self._stopping.set()

    def answered(self, count: int) -> int:
        """Wait until ``count`` more chats than now have been answered; returns the new total."""
        target = self.ok + count
        wait_until(lambda: self.ok >= target or self.failed, timeout_s=count, what="the chats")
        return self.ok


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
        traffic = Traffic(client)
        traffic.start()
        try:
            traffic.answered(BEFORE_OUTAGE)
            proxy.cut()
            at_cut = traffic.ok
            traffic.answered(DURING_OUTAGE // 2)
            written_mid_outage = sink.written
            at_restore = traffic.answered(DURING_OUTAGE - DURING_OUTAGE // 2)
            # every chat answered in the outage waits in the sink: none reached the database
            wait_until(lambda: sink.depth >= at_restore - at_cut, what="the rows queued")
            written_at_end_of_outage = sink.written
            proxy.restore()
            traffic.answered(AFTER_OUTAGE)
        finally:
            traffic.stop()
            traffic.join(timeout=10)
        assert not traffic.is_alive()

    # chat answered throughout, the outage included
    assert traffic.failed == []
    assert traffic.ok == traffic.sent
    # nothing reached the database while it was away; the sink held the rows
    assert written_at_end_of_outage == written_mid_outage

    wait_until(lambda: sink.depth == 0, timeout_s=DRAIN_TIMEOUT_S, what="the drained sink")
    assert sink.dropped == 0
    assert sink.written == traffic.sent

    rows, queries = run_sync(_count(pg_url(pg_database)))
    assert rows == traffic.sent
    assert queries == traffic.sent
    assert proxy.cuts == 1
