"""The usage sink: a bounded queue drained in batches into the query-log store.

Requests only ``put`` (never wait on the database). A writer task takes up to ``batch_size``
rows or whatever arrived within ``interval_s``, and writes them in one transaction.

One bad row never stops the writer. When the store refuses a batch for its data
(``RowsRejected``: a value the database cannot store), the batch is split in halves, and
halves again, until the refused rows stand alone: every other row is written, each refused
row is dropped, counted (``rejected``) and logged with its request id. While the database is
unreachable (``StoreUnavailable``, ``OSError``) the batch is retried with backoff, topped up
from the queue, and nothing is dropped; the queue absorbs new rows and drops (and counts,
``overflowed``) only when full. An error of neither kind is retried like an outage a few
times, then the batch is split too, but a row failing alone that way is dropped only when
other rows were written in the same attempt (so the database does take writes and that row
is the problem); a systemic failure (a broken schema, a bug) never drops anything.

Per-account sums of rows not yet written are kept so ``/v1/usage`` includes them; a row
leaves them when it is written or dropped. ``stalled_s`` tells how long rows have waited
without the writer getting any of them out, for readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from nilai.logging import request_id_var
from nilai.outages import OutageLog
from nilai.store.base import QueryLog, QueryLogRepo, RowsRejected, StoreUnavailable, Usage

logger = logging.getLogger(__name__)

# Whole-batch retries of an unclassified error before the batch is split to look for a bad row.
UNCLASSIFIED_RETRIES = 3

type _FailureKind = Literal["rejected", "unavailable", "unclassified"]


def _failure_kind(error: Exception) -> _FailureKind:
    if isinstance(error, RowsRejected):
        return "rejected"
    if isinstance(error, StoreUnavailable | OSError):
        return "unavailable"
    return "unclassified"


def _describe(error: Exception) -> str:
    """The error's class, and the store's own description (class, SQLSTATE), never values."""
    if isinstance(error, RowsRejected | StoreUnavailable):
        return f"{type(error).__name__}: {error}"
    return type(error).__name__


@dataclass
class _Attempt:
    """One pass over the batch in hand."""

    split_unclassified: bool
    landed: int = 0
    suspects: list[tuple[QueryLog, Exception]] = field(
        default_factory=list[tuple[QueryLog, Exception]]
    )
    halted_by: Exception | None = None


class UsageSink:
    """Batches query logs into the store, off the request path."""

    def __init__(
        self,
        store: QueryLogRepo,
        *,
        capacity: int = 100_000,
        batch_size: int = 500,
        interval_s: float = 1.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._store = store
        self._queue: asyncio.Queue[QueryLog] = asyncio.Queue(maxsize=capacity)
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._max_backoff_s = max_backoff_s
        self._outage = OutageLog(
            logger,
            "query-log database",
            f"query logs wait in memory (up to {capacity}) and are written once it answers",
        )
        self._pending: dict[str, Usage] = defaultdict(Usage)
        self._task: asyncio.Task[None] | None = None
        self._batch: list[QueryLog] = []
        # The writer is only cancelled while it waits, never in the middle of a write.
        self._waiting = False
        self._stopping = False
        # When rows last left the backlog (written or dropped), and when the backlog last
        # started from empty: the later of the two is how long rows have waited for the writer.
        self._progress_at = time.monotonic()
        self._backlog_since = self._progress_at
        self.overflowed = 0
        """Rows dropped because the queue was full."""
        self.rejected = 0
        """Rows dropped because the database refused a value in them."""
        self.written = 0
        self.version = 0
        """Bumped after each write or drop, so a reader can tell rows left between two reads."""

    @property
    def depth(self) -> int:
        """Rows waiting to be written (queued plus the batch in hand)."""
        return self._queue.qsize() + len(self._batch)

    @property
    def dropped(self) -> int:
        """Rows that will never be written: the queue was full, or the database refused them."""
        return self.overflowed + self.rejected

    @property
    def stalled_s(self) -> float:
        """Seconds rows have waited with none written or dropped; 0 when nothing waits."""
        if self.depth == 0:
            return 0.0
        return time.monotonic() - max(self._progress_at, self._backlog_since)

    def put(self, log: QueryLog) -> None:
        """Queue a row; if the queue is full the row is dropped and counted."""
        was_empty = self.depth == 0
        try:
            self._queue.put_nowait(log)
        except asyncio.QueueFull:
            self.overflowed += 1
            if self.overflowed % 1000 == 1:
                logger.error("usage queue full: %d query logs dropped so far", self.overflowed)  # noqa: TRY400
            return
        if was_empty:
            self._backlog_since = time.monotonic()
        self._pending[log.account_id] += _usage(log)

    def pending(self, account_id: str) -> Usage:
        """Usage of rows for ``account_id`` not yet in the database."""
        return self._pending.get(account_id, Usage())

    async def start(self) -> None:
        """Start the writer task."""
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (for at most ``timeout_s``), then stop.

        The same isolation applies as while running: a refused row is dropped, not retried
        until the timeout takes the whole backlog with it.
        """
        if self._task is None:
            return
        self._stopping = True
        try:
            async with asyncio.timeout(timeout_s):
                if self._waiting:
                    self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                while self._batch or not self._queue.empty():
                    self._fill_batch()
                    await self._write_with_retry()
        except TimeoutError:
            self._task.cancel()
            logger.error("shutdown: %d query logs could not be written", self.depth)  # noqa: TRY400

    async def _run(self) -> None:
        while not self._stopping:
            if not self._batch:
                self._batch.append(await self._wait(self._queue.get()))
                await self._gather()
            await self._write_with_retry()

    async def _wait[T](self, awaitable: Awaitable[T]) -> T:
        """Await something that may be cancelled safely (no write in progress)."""
        self._waiting = True
        try:
            return await awaitable
        finally:
            self._waiting = False

    async def _gather(self) -> None:
        """Top up the batch for up to ``interval_s`` or until it is full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._interval_s
        while len(self._batch) < self._batch_size:
            self._fill_batch()
            remaining = deadline - loop.time()
            if len(self._batch) >= self._batch_size or remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    self._batch.append(await self._wait(self._queue.get()))
            except TimeoutError:
                return

    def _fill_batch(self) -> None:
        while len(self._batch) < self._batch_size and not self._queue.empty():
            self._batch.append(self._queue.get_nowait())

    async def _write_with_retry(self) -> None:
        """Get the batch in hand out (written, or refused rows dropped); back off meanwhile."""
        delay = 0.1
        unclassified = 0
        while True:
            # Topping up a retried batch lets the first write after an outage be a full one,
            # and gives a suspect row neighbours whose success shows the database takes writes.
            self._fill_batch()
            if not self._batch:
                return
            failure = await self._write_batch(
                split_unclassified=unclassified >= UNCLASSIFIED_RETRIES
            )
            if failure is None:
                self._outage.answered()
                return
            kind = _failure_kind(failure)
            if kind == "unavailable":
                # One line when the outage starts and one when it ends, not one per retry.
                self._outage.failed(failure)
            else:
                unclassified += 1
                logger.warning(
                    "writing %d query logs failed (%s); retrying in %.1fs",
                    len(self._batch),
                    _describe(failure),
                    delay,
                )
            await self._wait(asyncio.sleep(delay))
            delay = min(delay * 2, self._max_backoff_s)

    async def _write_batch(self, *, split_unclassified: bool) -> Exception | None:
        """One pass over the batch; the error that left rows in it, or None when it is empty."""
        attempt = _Attempt(split_unclassified)
        await self._write_part(list(self._batch), attempt)
        if attempt.halted_by is not None:
            return attempt.halted_by
        if attempt.suspects:
            if not attempt.landed:  # nothing else was written: no sign these rows are the cause
                return attempt.suspects[0][1]
            for log, error in attempt.suspects:
                self._drop_rejected(log, error)
        return None

    async def _write_part(self, rows: Sequence[QueryLog], attempt: _Attempt) -> None:
        """Write ``rows``; if the store refuses them for their data, split them until it doesn't.

        A bad row costs about 2·log2(batch size) extra writes; rows already written are
        skipped by the store (by id), so a part retried after an ambiguous failure is safe.
        """
        if attempt.halted_by is not None:
            return
        try:
            await self._store.write_logs(rows)
        except Exception as error:  # noqa: BLE001 - any failure is classified, none is lost
            kind = _failure_kind(error)
            if kind == "unavailable" or (kind == "unclassified" and not attempt.split_unclassified):
                attempt.halted_by = error
                return
            if len(rows) == 1:
                if kind == "rejected":
                    self._drop_rejected(rows[0], error)
                else:
                    attempt.suspects.append((rows[0], error))
                return
            middle = len(rows) // 2
            await self._write_part(rows[:middle], attempt)
            await self._write_part(rows[middle:], attempt)
            return
        attempt.landed += len(rows)
        self._leave(rows)
        self.written += len(rows)

    def _drop_rejected(self, log: QueryLog, error: Exception) -> None:
        self._leave([log])
        self.rejected += 1
        # The line carries the dropped row's request id, as the request's own lines do, so an
        # operator can find the request; nothing else of the row is logged.
        request_id = log.request_id if log.request_id.isprintable() else ascii(log.request_id)
        token = request_id_var.set(request_id)
        try:
            logger.error("query log dropped: the database refused it (%s)", _describe(error))
        finally:
            request_id_var.reset(token)

    def _leave(self, rows: Sequence[QueryLog]) -> None:
        """Take rows that were written or dropped out of the batch and the pending sums."""
        for log in rows:
            remaining = self._pending[log.account_id] - _usage(log)
            if remaining.queries:
                self._pending[log.account_id] = remaining
            else:
                del self._pending[log.account_id]
        # By identity: two rows with one id are two puts, each in the pending sums once.
        gone = {id(log) for log in rows}
        self._batch = [log for log in self._batch if id(log) not in gone]
        self._progress_at = time.monotonic()
        self.version += 1


def _usage(log: QueryLog) -> Usage:
    return Usage(log.prompt_tokens, log.completion_tokens, 1, log.cost_micro)
