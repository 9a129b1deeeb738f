"""The usage sink writing into the real store, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from sqlalchemy import func, select

from nilai.store.base import QueryLog, Usage
from nilai.store.sql import SqlStore
from nilai.store.tables import QueryLogRow
from nilai.usage.sink import UsageSink
from tests.support.records import query_log

pytestmark = pytest.mark.integration

ALICE = "acct_alice"
BOB = "acct_bob"


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


async def _eventually(check, timeout_s: float = 5.0, interval_s: float = 0.02) -> float:
    """Await ``check()`` until it is true; return the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
    return time.monotonic() - start


class FlakyStore:
    """The real store, except that ``write_logs`` fails while ``failing`` is set.

    With ``commit_then_fail`` the batch is written first and the error raised afterwards, as
    when the connection drops after the commit landed.
    """

    def __init__(self, store: SqlStore, *, failing: bool = True, commit_then_fail: bool = False):
        self.store = store
        self.failing = failing
        self.commit_then_fail = commit_then_fail
        self.attempts: list[float] = []
        self.failures = 0

    async def write_logs(self, logs: Sequence[QueryLog]) -> int:
        self.attempts.append(time.monotonic())
        if self.failing:
            self.failures += 1
            if self.commit_then_fail:
                await self.store.write_logs(logs)
            raise ConnectionResetError("database unreachable")
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
    sink = UsageSink(store, interval_s=0.2, batch_size=1000)
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

            took = await _eventually(landed, timeout_s=3)
            assert took < 0.2 + 1.0
        assert sink.written == 75
        assert await _rows(store) == 75
        assert sink.pending(ALICE) == Usage()
        assert sink.dropped == 0
    finally:
        await sink.aclose()


async def test_a_full_batch_is_written_without_waiting_for_the_interval(store: SqlStore):
    sink = UsageSink(store, interval_s=30, batch_size=10)
    await sink.start()
    try:
        for _ in range(10):
            sink.put(_log())

        async def written() -> bool:
            return sink.written == 10

        assert await _eventually(written, timeout_s=3) < 3
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

        await _eventually(drained)
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

        await _eventually(drained)
        assert sink.written == 8
    finally:
        gated.gate.set()
        await sink.aclose()


@pytest.mark.parametrize("commit_then_fail", [False, True], ids=["fails", "commits-then-fails"])
async def test_outage_loses_nothing_and_backs_off(store: SqlStore, commit_then_fail: bool):
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
        assert flaky.failures >= 5
        assert sink.depth == len(sent)  # nothing written, nothing lost
        assert sink.written == 0
        assert sink.pending(ALICE) + sink.pending(BOB) == _sum(sent, ALICE) + _sum(sent, BOB)

        # retries back off: each gap at least the previous one, doubling up to the cap
        gaps = [b - a for a, b in zip(flaky.attempts, flaky.attempts[1:], strict=False)]
        assert gaps[0] >= 0.09
        assert gaps[1] >= 0.18
        assert gaps[2] >= 0.36
        assert all(0.36 <= gap < 0.4 + 0.3 for gap in gaps[3:])
        assert max(gaps) < 0.7

        flaky.failing = False

        async def drained() -> bool:
            return sink.depth == 0

        await _eventually(drained, timeout_s=5)
    finally:
        flaky.failing = False
        await sink.aclose()
    assert sink.written == len(sent)
    assert await _rows(store) == len(sent)
    assert await store.usage(ALICE) == _sum(sent, ALICE)
    assert await store.usage(BOB) == _sum(sent, BOB)
    assert sink.pending(ALICE) == Usage()
    assert sink.dropped == 0


async def test_aclose_gives_up_after_its_timeout_while_the_store_is_down(store: SqlStore):
    flaky = FlakyStore(store)
    sink = UsageSink(flaky, interval_s=0.01, max_backoff_s=0.1)
    await sink.start()
    for _ in range(3):
        sink.put(_log())
    start = time.monotonic()
    await sink.aclose(timeout_s=0.5)
    assert 0.4 < time.monotonic() - start < 2
    assert sink.depth == 3
    assert sink.written == 0
    assert await _rows(store) == 0
