"""The usage sink writing into the real store, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from sqlalchemy import func, select

from nilai.logging import request_id_var
from nilai.store.base import QueryLog, QueryLogRepo, StoreUnavailable, Usage
from nilai.store.sql import SqlStore, make_engine
from nilai.store.tables import QueryLogRow
from nilai.usage import sink as sink_module
from nilai.usage.sink import UNCLASSIFIED_RETRIES, UsageSink
from tests.support.records import query_log
from tests.support.servers import wait_until_async
from tests.support.stores import pg_url
from tests.support.timing import FakeClock

pytestmark = pytest.mark.integration

ALICE = "acct_alice"
BOB = "acct_bob"
CAROL = "acct_carol"


def _log(account_id: str = ALICE, prompt: int = 3, completion: int = 5) -> QueryLog:
    return query_log(account_id, prompt, completion)


def _sum(logs: Sequence[QueryLog], account_id: str) -> Usage:
    total = Usage()
    for log in logs:
        if log.account_id == account_id:
            total += Usage(log.prompt_tokens, log.completion_tokens, 1)
    return total


async def _rows(store: SqlStore) -> int:
    async with store.session() as session:
        return (await session.execute(select(func.count()).select_from(QueryLogRow))).scalar_one()


async def _stored_ids(store: SqlStore) -> set[str]:
    async with store.session() as session:
        return set((await session.execute(select(QueryLogRow.id))).scalars())


def _refused_rows(store: SqlStore) -> list[QueryLog]:
    """Rows holding a value this backend's database cannot store (each fails on its own)."""
    refused = [
        query_log(CAROL, model="bad\ud800model"),  # a lone surrogate has no UTF-8 form
        query_log(CAROL, prompt_tokens=2**70),  # beyond any integer column
    ]
    if store.engine.dialect.name == "postgresql":
        refused += [
            query_log(CAROL, model="bad\x00model"),  # PostgreSQL text cannot hold NUL
            query_log(CAROL, model="m" * 300),  # longer than the column
            query_log(CAROL, completion_tokens=2**40),  # beyond INTEGER
        ]
    return refused


def _unreachable_store(store: SqlStore, tmp_path: Path) -> SqlStore:
    """A store of the same backend whose database cannot be reached."""
    if store.engine.dialect.name == "postgresql":
        return SqlStore(make_engine(pg_url("nilai", port=1)))  # nothing listens on port 1
    return SqlStore(make_engine(f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/nilai.db"))


class FlakyStore:
    """The real store, except that ``write_logs`` fails while ``failing`` is set.

    With ``commit_then_fail`` the batch is written first and the error raised afterwards, as
    when the connection drops after the commit landed.
    """

    def __init__(self, store: SqlStore, *, failing: bool = True, commit_then_fail: bool = False):
        self.store = store
        self.failing = failing
        self.commit_then_fail = commit_then_fail
        self.failures = 0

    async def write_logs(self, logs: Sequence[QueryLog]) -> int:
        if self.failing:
            self.failures += 1
            if self.commit_then_fail:
                await self.store.write_logs(logs)
            raise ConnectionResetError("database unreachable")
        return await self.store.write_logs(logs)

    async def usage(self, account_id: str) -> Usage:
        return await self.store.usage(account_id)


class SinkAsyncio:
    """Stands in for ``asyncio`` in the sink's module: records each ``sleep`` (its backoff).

    The sleep itself still happens; everything else is ``asyncio``'s own.
    """

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def __getattr__(self, name: str) -> object:
        return getattr(asyncio, name)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        await asyncio.sleep(delay)


class BatchSizes:
    """The real store; the size of each batch written is kept."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.sizes: list[int] = []

    async def write_logs(self, logs: Sequence[QueryLog]) -> int:
        self.sizes.append(len(logs))
        return await self.store.write_logs(logs)

    async def usage(self, account_id: str) -> Usage:
        return await self.store.usage(account_id)


class RequestIdLines(logging.Handler):
    """Keeps (request id, message) of each record, the request id as the log line shows it."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((request_id_var.get(), record.getMessage()))


class SwitchStore:
    """Writes go to ``current`` (switched by the test); every error raised is kept."""

    def __init__(self, current: QueryLogRepo) -> None:
        self.current = current
        self.errors: list[Exception] = []

    async def write_logs(self, logs: Sequence[QueryLog]) -> int:
        try:
            return await self.current.write_logs(logs)
        except Exception as exc:
            self.errors.append(exc)
            raise

    async def usage(self, account_id: str) -> Usage:
        return await self.current.usage(account_id)


class PickyStore:
    """The real store, except that a batch holding a row ``refuses`` picks fails with an error
    of no known kind (neither ``RowsRejected`` nor ``StoreUnavailable``)."""

    def __init__(self, store: SqlStore, refuses: Callable[[QueryLog], bool]) -> None:
        self.store = store
        self.refuses = refuses
        self.calls = 0

    async def write_logs(self, logs: Sequence[QueryLog]) -> int:
        self.calls += 1
        if any(self.refuses(log) for log in logs):
            raise RuntimeError("something nobody foresaw")
        return await self.store.write_logs(logs)

    async def usage(self, account_id: str) -> Usage:
        return await self.store.usage(account_id)


class GatedStore:
    """The real store; each ``write_logs`` waits until ``gate`` is open."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def write_logs(self, logs: Sequence[QueryLog]) -> int:
        self.entered.set()
        await self.gate.wait()
        return await self.store.write_logs(logs)

    async def usage(self, account_id: str) -> Usage:
        return await self.store.usage(account_id)


async def test_batches_are_written_within_the_interval(store: SqlStore):
    recorded = BatchSizes(store)
    sink = UsageSink(recorded, interval_s=0.2, batch_size=1000)
    await sink.start()
    try:
        for burst in range(3):
            logs = [_log(ALICE if i % 2 else BOB, prompt=i, completion=burst) for i in range(25)]
            before_alice, before_bob = await store.usage(ALICE), await store.usage(BOB)
            for log in logs:
                sink.put(log)

            async def landed(
                logs: list[QueryLog] = logs, a: Usage = before_alice, b: Usage = before_bob
            ) -> bool:
                return (
                    await store.usage(ALICE) == a + _sum(logs, ALICE)
                    and await store.usage(BOB) == b + _sum(logs, BOB)
                    and sink.depth == 0
                )

            await wait_until_async(landed)
        # Each burst went out on its own, far from filling a batch: the interval wrote it.
        assert recorded.sizes == [25, 25, 25]
        assert sink.written == 75
        assert await _rows(store) == 75
        assert sink.pending(ALICE) == Usage()
        assert sink.dropped == 0
    finally:
        await sink.aclose()


async def test_a_full_batch_is_written_without_waiting_for_the_interval(store: SqlStore):
    sink = UsageSink(store, interval_s=3600, batch_size=10)
    await sink.start()
    try:
        for _ in range(10):
            sink.put(_log())

        async def written() -> bool:
            return sink.written == 10

        await wait_until_async(written)  # long before the hour is up
        assert await store.usage(ALICE) == Usage(30, 50, 10)
    finally:
        await sink.aclose()


async def test_pending_covers_rows_not_yet_written(store: SqlStore):
    gated = GatedStore(store)
    sink = UsageSink(gated, interval_s=0.05, batch_size=4)
    await sink.start()
    logs = [_log(ALICE, prompt=i, completion=1) for i in range(10)] + [_log(BOB, 7, 7)]
    try:
        for log in logs:
            sink.put(log)
        assert sink.pending(ALICE) == _sum(logs, ALICE)
        assert sink.pending(BOB) == Usage(7, 7, 1)
        assert sink.pending("acct_nobody") == Usage()
        assert sink.depth == 11

        await asyncio.wait_for(gated.entered.wait(), 3)  # the first batch is in hand, blocked
        assert sink.depth == 11
        assert sink.pending(ALICE) == _sum(logs, ALICE)
        assert await store.usage(ALICE) == Usage()

        gated.gate.set()

        async def drained() -> bool:
            return sink.depth == 0

        await wait_until_async(drained)
        assert sink.pending(ALICE) == Usage()
        assert sink.pending(BOB) == Usage()
        assert await store.usage(ALICE) == _sum(logs, ALICE)
        assert await store.usage(BOB) == Usage(7, 7, 1)
    finally:
        gated.gate.set()
        await sink.aclose()


async def test_aclose_flushes_everything(store: SqlStore):
    sink = UsageSink(store, interval_s=60, batch_size=50)
    await sink.start()
    logs = [_log(ALICE if i % 3 else BOB, prompt=i, completion=2 * i) for i in range(333)]
    for log in logs:
        sink.put(log)
    await asyncio.sleep(0.05)
    await sink.aclose()
    assert sink.depth == 0
    assert sink.written == 333
    assert await _rows(store) == 333
    assert await store.usage(ALICE) == _sum(logs, ALICE)
    assert await store.usage(BOB) == _sum(logs, BOB)
    assert sink.pending(ALICE) == Usage()


async def test_aclose_without_start_does_nothing(store: SqlStore):
    sink = UsageSink(store)
    await sink.aclose()
    assert await _rows(store) == 0


async def test_overflow_drops_and_counts(store: SqlStore):
    sink = UsageSink(store, capacity=5, interval_s=0.05)
    logs = [_log(ALICE, prompt=1, completion=i) for i in range(8)]
    for log in logs:  # the writer is not running yet: nothing leaves the queue
        sink.put(log)
    assert sink.dropped == 3
    assert sink.depth == 5
    assert sink.pending(ALICE) == _sum(logs[:5], ALICE)  # dropped rows are not pending

    await sink.start()
    await sink.aclose()
    assert sink.written == 5
    assert await _rows(store) == 5
    assert await store.usage(ALICE) == _sum(logs[:5], ALICE)
    assert sink.pending(ALICE) == Usage()
    assert sink.dropped == 3


async def test_depth_reflects_queued_rows(store: SqlStore):
    gated = GatedStore(store)
    sink = UsageSink(gated, interval_s=0.01, batch_size=3)
    assert sink.depth == 0
    await sink.start()
    try:
        for i in range(1, 8):
            sink.put(_log())
            assert sink.depth == i
        await asyncio.wait_for(gated.entered.wait(), 3)
        assert sink.depth == 7  # three in the batch being written, four queued
        sink.put(_log())
        assert sink.depth == 8
        gated.gate.set()

        async def drained() -> bool:
            return sink.depth == 0

        await wait_until_async(drained)
        assert sink.written == 8
    finally:
        gated.gate.set()
        await sink.aclose()


@pytest.mark.parametrize("commit_then_fail", [False, True], ids=["fails", "commits-then-fails"])
async def test_outage_loses_nothing_and_backs_off(
    store: SqlStore, commit_then_fail: bool, monkeypatch: pytest.MonkeyPatch
):
    backoff = SinkAsyncio()
    monkeypatch.setattr(sink_module, "asyncio", backoff)
    flaky = FlakyStore(store, commit_then_fail=commit_then_fail)
    sink = UsageSink(flaky, interval_s=0.02, batch_size=20, max_backoff_s=0.4)
    await sink.start()
    sent: list[QueryLog] = []
    try:
        # traffic keeps arriving while the store is down
        for _ in range(30):
            for _ in range(5):
                log = _log(ALICE if len(sent) % 4 else BOB, prompt=2, completion=len(sent) % 9)
                sent.append(log)
                sink.put(log)
            await asyncio.sleep(0.05)

        async def failed_five_times() -> bool:
            return flaky.failures >= 5

        await wait_until_async(failed_five_times)
        assert sink.depth == len(sent)  # nothing written, nothing lost
        assert sink.written == 0
        assert sink.pending(ALICE) + sink.pending(BOB) == _sum(sent, ALICE) + _sum(sent, BOB)

        # retries back off: one wait after each failure, doubling up to the cap
        assert len(backoff.sleeps) == flaky.failures
        assert backoff.sleeps[:3] == [0.1, 0.2, 0.4]
        assert set(backoff.sleeps[3:]) == {0.4}

        flaky.failing = False

        async def drained() -> bool:
            return sink.depth == 0

        await wait_until_async(drained, timeout_s=5)
    finally:
        flaky.failing = False
        await sink.aclose()
    assert sink.written == len(sent)
    assert await _rows(store) == len(sent)
    assert await store.usage(ALICE) == _sum(sent, ALICE)
    assert await store.usage(BOB) == _sum(sent, BOB)
    assert sink.pending(ALICE) == Usage()
    assert sink.dropped == 0


async def test_aclose_gives_up_after_its_timeout_while_the_store_is_down(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
):
    logged = RequestIdLines()
    monkeypatch.setattr(logging.getLogger("nilai.usage.sink"), "handlers", [logged])
    flaky = FlakyStore(store)
    sink = UsageSink(flaky, interval_s=0.01, max_backoff_s=0.1)
    await sink.start()
    for _ in range(3):
        sink.put(_log())
    failures_before = flaky.failures
    async with asyncio.timeout(30):  # a safety net: aclose must not wait for the store
        await sink.aclose(timeout_s=0.5)
    assert flaky.failures - failures_before >= 2  # it kept retrying while its time lasted
    assert [line for _, line in logged.lines if line.startswith("shutdown")] == [
        "shutdown: 3 query logs could not be written"
    ]
    assert sink.depth == 3
    assert sink.written == 0
    assert await _rows(store) == 0


async def test_a_row_the_database_refuses_is_dropped_and_every_other_row_lands(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
):
    refused = _refused_rows(store)
    valid = [_log(ALICE if i % 3 else CAROL, prompt=i, completion=2) for i in range(40)]
    batch = list(valid)
    for n, bad in enumerate(refused):  # spread through the batch, first row included
        batch.insert(n * 9, bad)
    sink = UsageSink(store, batch_size=len(batch), interval_s=0.05)
    for log in batch:  # the writer is not running yet: all of them make one batch
        sink.put(log)
    assert sink.pending(CAROL) == _sum(batch, CAROL)
    logged = RequestIdLines()
    sink_logger = logging.getLogger("nilai.usage.sink")
    monkeypatch.setattr(sink_logger, "handlers", [logged])
    await sink.start()
    try:

        async def settled() -> bool:
            return sink.depth == 0

        await wait_until_async(settled)
        assert await _stored_ids(store) == {log.id for log in valid}
        assert await store.usage(ALICE) == _sum(valid, ALICE)
        assert await store.usage(CAROL) == _sum(valid, CAROL)
        assert sink.written == len(valid)
        assert sink.rejected == len(refused)
        assert sink.dropped == len(refused)
        assert sink.overflowed == 0
        # dropped rows left the pending sums too: /v1/usage does not count them forever
        assert sink.pending(ALICE) == Usage()
        assert sink.pending(CAROL) == Usage()

        # one log line per dropped row, with its request id and none of its values
        dropped = [(rid, line) for rid, line in logged.lines if "dropped" in line]
        assert sorted(rid for rid, _ in dropped) == sorted(bad.request_id for bad in refused)
        for _, line in dropped:
            assert "model" not in line
            assert str(2**70) not in line
            assert str(2**40) not in line

        # and the writer goes on writing later rows
        later = [_log(BOB, prompt=1, completion=i) for i in range(5)]
        for log in later:
            sink.put(log)

        async def later_landed() -> bool:
            return await store.usage(BOB) == _sum(later, BOB)

        await wait_until_async(later_landed)
    finally:
        await sink.aclose()


async def test_shutdown_writes_every_valid_row_despite_a_refused_one(store: SqlStore):
    sink = UsageSink(store, interval_s=60, batch_size=50)
    await sink.start()
    valid = [_log(ALICE if i % 2 else BOB, prompt=i, completion=1) for i in range(120)]
    bad = _refused_rows(store)[0]
    for log in [*valid[:77], bad, *valid[77:]]:
        sink.put(log)
    await sink.aclose(timeout_s=5)
    assert sink.depth == 0
    assert await _stored_ids(store) == {log.id for log in valid}
    assert await store.usage(ALICE) == _sum(valid, ALICE)
    assert await store.usage(BOB) == _sum(valid, BOB)
    assert sink.rejected == 1
    assert sink.pending(CAROL) == Usage()


async def test_an_unreachable_database_is_retried_and_no_row_is_dropped(
    store: SqlStore, tmp_path: Path
):
    unreachable = _unreachable_store(store, tmp_path)
    switch = SwitchStore(unreachable)
    valid = [_log(ALICE, prompt=2, completion=i) for i in range(30)]
    bad = _refused_rows(store)[1]
    rows = [*valid[:10], bad, *valid[10:]]
    sink = UsageSink(switch, interval_s=0.02, batch_size=20, max_backoff_s=0.1)
    for log in rows:
        sink.put(log)
    await sink.start()
    try:

        async def retried() -> bool:
            return len(switch.errors) >= 2 * UNCLASSIFIED_RETRIES

        await wait_until_async(retried)
        assert {type(error) for error in switch.errors} == {StoreUnavailable}
        assert sink.dropped == 0  # an outage never costs a row, not even the bad one
        assert sink.written == 0
        assert sink.depth == len(rows)
        assert sink.pending(ALICE) + sink.pending(CAROL) == _sum(rows, ALICE) + _sum(rows, CAROL)

        switch.current = store

        async def drained() -> bool:
            return sink.depth == 0

        await wait_until_async(drained)
    finally:
        switch.current = store
        await sink.aclose()
        await unreachable.aclose()
    assert await _stored_ids(store) == {log.id for log in valid}
    assert await store.usage(ALICE) == _sum(valid, ALICE)
    assert sink.rejected == 1
    assert sink.pending(CAROL) == Usage()


async def test_a_row_failing_for_an_unknown_reason_is_dropped_once_the_others_are_written(
    store: SqlStore,
):
    picky = PickyStore(store, refuses=lambda log: log.account_id == CAROL)
    valid = [_log(ALICE, prompt=i, completion=1) for i in range(20)]
    bad = _log(CAROL)
    sink = UsageSink(picky, interval_s=0.02, batch_size=32, max_backoff_s=0.05)
    for log in [*valid[:5], bad, *valid[5:]]:
        sink.put(log)
    await sink.start()
    try:

        async def settled() -> bool:
            return sink.depth == 0

        await wait_until_async(settled)
    finally:
        await sink.aclose()
    assert picky.calls > UNCLASSIFIED_RETRIES  # the whole batch was retried first
    assert await _stored_ids(store) == {log.id for log in valid}
    assert await store.usage(ALICE) == _sum(valid, ALICE)
    assert sink.rejected == 1
    assert sink.pending(CAROL) == Usage()


async def test_an_unknown_error_on_every_row_drops_nothing(store: SqlStore):
    picky = PickyStore(store, refuses=lambda log: True)  # a broken schema, a bug: not the rows
    rows = [_log(ALICE, prompt=i, completion=1) for i in range(10)]
    sink = UsageSink(picky, interval_s=0.02, batch_size=32, max_backoff_s=0.05)
    for log in rows:
        sink.put(log)
    await sink.start()
    try:

        async def split_several_times() -> bool:
            return picky.calls >= UNCLASSIFIED_RETRIES + 3 * (2 * len(rows) - 1)

        await wait_until_async(split_several_times)
        assert sink.dropped == 0
        assert sink.depth == len(rows)
        assert sink.pending(ALICE) == _sum(rows, ALICE)

        picky.refuses = lambda log: False

        async def drained() -> bool:
            return sink.depth == 0

        await wait_until_async(drained)
    finally:
        picky.refuses = lambda log: False
        await sink.aclose()
    assert await store.usage(ALICE) == _sum(rows, ALICE)
    assert sink.dropped == 0


async def test_stalled_seconds_grow_while_rows_wait_unwritten_and_reset_once_written(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
):
    clock = FakeClock().install(monkeypatch, sink_module)
    gated = GatedStore(store)
    sink = UsageSink(gated, interval_s=0.01, batch_size=10)
    await sink.start()
    try:
        assert sink.stalled_s == 0
        clock.advance(30)  # nothing waits: an idle sink is not stalled however long it idles
        assert sink.stalled_s == 0
        sink.put(_log())
        await asyncio.wait_for(gated.entered.wait(), 3)
        assert sink.stalled_s == 0
        clock.advance(7)
        assert sink.stalled_s == 7
        gated.gate.set()

        async def drained() -> bool:
            return sink.depth == 0

        await wait_until_async(drained)
        assert sink.stalled_s == 0
        # a later backlog is timed from when it formed, not from the last write
        clock.advance(50)
        sink.put(_log())
        assert sink.stalled_s == 0
        clock.advance(2)
        assert sink.stalled_s == 2
    finally:
        gated.gate.set()
        await sink.aclose()
