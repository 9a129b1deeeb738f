"""The usage sink: a bounded queue drained in batches into the query-log store.

Requests only ``put`` (never wait on the database). A writer task takes up to ``batch_size``
rows or whatever arrived within ``interval_s``, and writes them in one transaction; while the
database is down it retries the same batch with backoff and the queue absorbs new rows. Rows are
dropped, and counted, only when the queue is full. Per-account sums of rows not yet written are
kept so ``/v1/usage`` includes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable

from nilai.store.base import QueryLog, QueryLogRepo, Usage

logger = logging.getLogger(__name__)


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
        self._pending: dict[str, Usage] = defaultdict(Usage)
        self._task: asyncio.Task[None] | None = None
        self._batch: list[QueryLog] = []
        # The writer is only cancelled while it waits, never in the middle of a write.
        self._waiting = False
        self._stopping = False
        self.dropped = 0
        self.written = 0
        self.version = 0
        """Bumped after each write, so a reader can tell a batch landed between two reads."""

    @property
    def depth(self) -> int:
        """Rows waiting to be written (queued plus the batch in hand)."""
        return self._queue.qsize() + len(self._batch)

    def put(self, log: QueryLog) -> None:
        """Queue a row; if the queue is full the row is dropped and counted."""
        try:
            self._queue.put_nowait(log)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                logger.error("usage queue full: %d query logs dropped so far", self.dropped)  # noqa: TRY400
            return
        self._pending[log.account_id] += _usage(log)

    def pending(self, account_id: str) -> Usage:
        """Usage of rows for ``account_id`` not yet in the database."""
        return self._pending.get(account_id, Usage())

    async def start(self) -> None:
        """Start the writer task."""
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (for at most ``timeout_s``), then stop."""
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
        delay = 0.1
        while True:
            try:
                await self._write_batch()
            except Exception as exc:  # noqa: BLE001 - any database failure: keep and retry
                logger.warning(
                    "writing %d query logs failed (%s); retrying in %.1fs",
                    len(self._batch),
                    type(exc).__name__,
                    delay,
                )
                await self._wait(asyncio.sleep(delay))
                delay = min(delay * 2, self._max_backoff_s)
            else:
                return

    async def _write_batch(self) -> None:
        if not self._batch:
            return
        await self._store.write_logs(self._batch)
        for log in self._batch:
            remaining = self._pending[log.account_id] - _usage(log)
            if remaining.queries:
                self._pending[log.account_id] = remaining
            else:
                del self._pending[log.account_id]
        self.written += len(self._batch)
        self.version += 1
        self._batch = []


def _usage(log: QueryLog) -> Usage:
    return Usage(log.prompt_tokens, log.completion_tokens, 1)
