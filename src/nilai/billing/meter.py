"""Metering against the credit service: lock an estimate before the model call, unlock after.

The pipeline locks once a request is admitted (a request refused for its parameters or its
limits never locks anything), and settles the lock exactly once, when the request is accounted,
whatever happened to it: answered, failed, timed out, or left by its client (then charged for
what was produced). Settling never blocks the request: unlocks are queued and made by a few
background workers, retried with backoff while the credit service is down, and flushed (within
a deadline) at shutdown. An unlock the service refuses (an unknown lock, one already unlocked:
a retry of an unlock whose answer was lost) is not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass

from nilai.auth.base import CreditCredential
from nilai.billing.credit import (
    CredentialRejected,
    CreditService,
    CreditUnavailable,
    InsufficientBalance,
    UnlockRefused,
)
from nilai.errors import AuthenticationFailed, BillingUnavailable, PaymentRequired
from nilai.outages import OutageLog

logger = logging.getLogger(__name__)

UNLOCK_WORKERS = 4
UNLOCK_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits between attempts of an unlock the credit service did not answer; the last repeats."""


@dataclass(frozen=True, slots=True)
class CreditLock:
    """Funds locked for one request."""

    lock_id: str
    amount_micro: int


@dataclass(slots=True)
class _Unlock:
    lock: CreditLock
    cost_micro: int
    attempts: int = 0


class CreditMeter:
    """Locks and unlocks funds at the credit service for metered principals."""

    def __init__(
        self,
        service: CreditService,
        *,
        retry_after_s: int,
        fail_open: bool = False,
        backoff_s: tuple[float, ...] = UNLOCK_BACKOFF_S,
        workers: int = UNLOCK_WORKERS,
        where: str | None = None,
    ) -> None:
        self._service = service
        self._retry_after_s = retry_after_s
        self._fail_open = fail_open
        self._backoff_s = backoff_s
        self._workers = workers
        self._queue: asyncio.Queue[_Unlock] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._retries: dict[asyncio.TimerHandle, _Unlock] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.pending = 0
        """Unlocks queued, being made, or waiting to be retried."""
        self.unlocked = 0
        self.refused = 0
        self.unmetered = 0
        """Requests served without a lock while the service was down (``fail_open``)."""
        self.outage = OutageLog(
            logger,
            "the credit service",
            "metered requests are refused with 503 (or served unmetered with "
            "NILAI_CREDIT_FAIL_OPEN) and unlocks are retried",
            where=where,
        )

    @property
    def fail_open(self) -> bool:
        """Whether requests are served unmetered while the credit service is down."""
        return self._fail_open

    @property
    def retry_after_s(self) -> int:
        """The ``Retry-After`` of a 503 for the credit service being down."""
        return self._retry_after_s

    def start(self) -> None:
        """Start the unlock workers (in the running event loop)."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._work(), name=f"credit-unlock-{number}")
                for number in range(self._workers)
            ]

    async def lock(self, credit: CreditCredential, amount_micro: int) -> CreditLock | None:
        """Lock ``amount_micro`` of the principal's balance.

        Raises ``PaymentRequired`` (402) when the balance does not cover it,
        ``AuthenticationFailed`` (401) when the service does not know the holder, and
        ``BillingUnavailable`` (503, ``Retry-After``) when the service is down, unless the
        meter fails open: then the request goes unmetered (None), counted in ``unmetered``.
        """
        started = asyncio.get_running_loop().time()
        call = asyncio.ensure_future(
            self._service.lock(credit.credential, amount_micro, public=credit.public)
        )
        try:
            # Shielded: a client that leaves while the lock is being made must not leave a
            # lock made at the service that nobody unlocks; it is released at no cost.
            lock_id = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(functools.partial(self._release_orphan, amount_micro))
            raise
        except InsufficientBalance:
            self.outage.answered(started=started)
            raise PaymentRequired(
                "Your balance at the credit service does not cover this request's estimated "
                "cost; top it up, or ask for fewer tokens (max_tokens)."
            ) from None
        except CredentialRejected:
            self.outage.answered(started=started)
            raise AuthenticationFailed(
                "The credit service does not know this subscription holder.",
                code="credit_account_unknown",
            ) from None
        except CreditUnavailable as exc:
            self.outage.failed(exc, started=started)
            if self._fail_open:
                self.unmetered += 1
                return None
            raise self.unavailable() from None
        self.outage.answered(started=started)
        return CreditLock(lock_id, amount_micro)

    def _release_orphan(self, amount_micro: int, call: asyncio.Future[str]) -> None:
        """Unlock, at no cost, a lock whose request was cancelled while it was being made."""
        if call.cancelled() or call.exception() is not None:
            return
        self.settle(CreditLock(call.result(), amount_micro), 0)

    def unavailable(self) -> BillingUnavailable:
        """The 503 for the credit service being down."""
        return BillingUnavailable(
            "The credit service cannot be reached now; try again later.",
            retry_after_s=self._retry_after_s,
        )

    def settle(self, lock: CreditLock, cost_micro: int) -> None:
        """Queue the unlock of ``lock`` charging ``cost_micro``; call once per lock."""
        self.pending += 1
        self._idle.clear()
        self._queue.put_nowait(_Unlock(lock, max(0, cost_micro)))

    async def aclose(self, timeout_s: float) -> None:
        """Make the queued unlocks (within ``timeout_s``), then stop the workers.

        Unlocks still waiting are logged by count: the credit service releases a lock nobody
        unlocks by itself, at its full amount or not at all, as it decides.
        """
        # A retry waiting out its backoff is made now rather than abandoned.
        retried = len(self._retries)
        for handle, job in self._retries.items():
            handle.cancel()
            self._queue.put_nowait(job)
        self._retries.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                if retried:
                    logger.info("making %d delayed credit unlocks before shutdown", retried)
                await self._idle.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.pending:
            logger.error(
                "shut down with %d credit unlocks not made (the credit service did not answer)",
                self.pending,
            )

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._unlock(job)
            finally:
                self._queue.task_done()

    async def _unlock(self, job: _Unlock) -> None:
        job.attempts += 1
        started = asyncio.get_running_loop().time()
        try:
            await self._service.unlock(job.lock.lock_id, job.cost_micro)
        except UnlockRefused:
            # Refused on a retry: the first attempt was made, its answer lost.
            self.outage.answered(started=started)
            if job.attempts == 1:
                self.refused += 1
                logger.warning("the credit service refused an unlock (unknown lock)")
            self._done()
            return
        except CreditUnavailable as exc:
            self.outage.failed(exc, started=started)
            self._retry_later(job)
            return
        except Exception:
            logger.exception("credit unlock failed unexpectedly; retrying")
            self._retry_later(job)
            return
        self.outage.answered(started=started)
        self.unlocked += 1
        self._done()

    def _retry_later(self, job: _Unlock) -> None:
        delay = self._backoff_s[min(job.attempts - 1, len(self._backoff_s) - 1)]
        handles: list[asyncio.TimerHandle] = []

        def requeue() -> None:
            self._retries.pop(handles[0], None)
            self._queue.put_nowait(job)

        handles.append(asyncio.get_running_loop().call_later(delay, requeue))
        self._retries[handles[0]] = job

    def _done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self._idle.set()
