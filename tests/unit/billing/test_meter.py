"""``CreditMeter``: locks, exactly-once unlocks with retries, fail-open, and the flush at close."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from nilai.auth.base import CreditCredential
from nilai.billing.meter import CreditMeter
from nilai.errors import AuthenticationFailed, BillingUnavailable, PaymentRequired
from tests.fakes.credit import Ledger, MemoryCreditService
from tests.support.servers import wait_until_async

KEY = CreditCredential("key-of-user-1", public=False)
DID = CreditCredential("did:nil:holder", public=True)


@pytest.fixture
def credit() -> MemoryCreditService:
    ledger = Ledger()
    ledger.add_user("user-1", 1_000, key=KEY.credential, did=DID.credential)
    return MemoryCreditService(ledger)


def polled(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``condition`` as the coroutine function ``wait_until_async`` polls."""

    async def check() -> bool:
        return condition()

    return check


def meter_for(credit: MemoryCreditService, **kwargs: object) -> CreditMeter:
    meter = CreditMeter(credit, retry_after_s=7, backoff_s=(0.01,), **kwargs)  # type: ignore[arg-type]
    meter.start()
    return meter


async def test_a_lock_is_settled_once_with_the_real_cost(credit):
    meter = meter_for(credit)
    lock = await meter.lock(KEY, 600)
    assert lock is not None
    assert credit.ledger.locked("user-1") == 600
    meter.settle(lock, 250)
    await meter.aclose(5)
    record = credit.ledger.locks[lock.lock_id]
    assert record.unlocks == [250]
    assert record.refused_unlocks == 0
    assert credit.ledger.balances["user-1"] == 750
    assert (meter.unlocked, meter.pending) == (1, 0)


async def test_public_identifiers_lock_on_the_public_endpoint(credit):
    meter = meter_for(credit)
    lock = await meter.lock(DID, 1)
    assert lock is not None
    assert credit.ledger.locks[lock.lock_id].public
    meter.settle(lock, 0)
    await meter.aclose(5)


async def test_a_balance_too_small_is_402(credit):
    meter = meter_for(credit)
    with pytest.raises(PaymentRequired) as refused:
        await meter.lock(KEY, 1_001)
    assert refused.value.status == 402
    assert refused.value.headers["x-should-retry"] == "false"
    assert credit.ledger.locks == {}
    await meter.aclose(1)


async def test_an_unknown_holder_is_401(credit):
    meter = meter_for(credit)
    with pytest.raises(AuthenticationFailed):
        await meter.lock(CreditCredential("did:nil:stranger", public=True), 1)
    await meter.aclose(1)


async def test_the_service_down_is_503_with_retry_after_unless_failing_open(credit):
    credit.down = True
    meter = meter_for(credit)
    with pytest.raises(BillingUnavailable) as down:
        await meter.lock(KEY, 1)
    assert down.value.status == 503
    assert down.value.headers["Retry-After"] == "7"
    assert meter.outage.down
    await meter.aclose(1)
    open_meter = meter_for(credit, fail_open=True)
    assert await open_meter.lock(KEY, 1) is None
    assert open_meter.unmetered == 1
    await open_meter.aclose(1)


async def test_unlocks_are_retried_until_the_service_answers(credit):
    meter = meter_for(credit)
    lock = await meter.lock(KEY, 100)
    assert lock is not None
    credit.down = True
    meter.settle(lock, 40)
    await wait_until_async(
        polled(lambda: meter.outage.failures >= 3), what="failed unlock attempts"
    )
    assert credit.ledger.locks[lock.lock_id].unlocks == []
    credit.down = False
    await wait_until_async(polled(lambda: meter.pending == 0), what="the retried unlock")
    assert credit.ledger.locks[lock.lock_id].unlocks == [40]
    assert not meter.outage.down
    await meter.aclose(1)


async def test_close_makes_the_unlocks_waiting_for_a_retry(credit):
    meter = CreditMeter(credit, retry_after_s=1, backoff_s=(3600.0,))
    meter.start()
    lock = await meter.lock(KEY, 100)
    assert lock is not None
    credit.down = True
    meter.settle(lock, 5)
    await wait_until_async(polled(lambda: meter.outage.failures >= 1), what="a failed unlock")
    credit.down = False
    await meter.aclose(5)
    assert credit.ledger.locks[lock.lock_id].unlocks == [5]
    assert meter.pending == 0


async def test_close_gives_up_after_its_deadline(credit, caplog):
    meter = meter_for(credit)
    lock = await meter.lock(KEY, 100)
    assert lock is not None
    credit.down = True
    meter.settle(lock, 5)
    await meter.aclose(0.2)
    assert meter.pending == 1
    assert "1 credit unlocks not made" in caplog.text


async def test_an_unlock_refused_is_not_retried(credit):
    meter = meter_for(credit)
    lock = await meter.lock(KEY, 100)
    assert lock is not None
    await credit.unlock(lock.lock_id, 1)  # someone else unlocked it
    meter.settle(lock, 2)
    await meter.aclose(5)
    assert credit.ledger.locks[lock.lock_id].unlocks == [1]
    assert (meter.refused, meter.pending) == (1, 0)


async def test_a_lock_made_for_a_request_cancelled_meanwhile_is_released_at_no_cost(credit):
    meter = meter_for(credit)
    credit.ledger.delay_s = 0.0
    entered = asyncio.Event()
    release = asyncio.Event()
    real_lock = credit.lock

    async def slow_lock(credential: str, amount_micro: int, *, public: bool) -> str:
        entered.set()
        await release.wait()
        return await real_lock(credential, amount_micro, public=public)

    credit.lock = slow_lock  # type: ignore[method-assign]
    request = asyncio.create_task(meter.lock(KEY, 100))
    await entered.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    release.set()
    await wait_until_async(polled(lambda: bool(credit.ledger.locks)), what="the lock")
    await meter.aclose(5)
    (record,) = credit.ledger.locks.values()
    assert record.unlocks == [0]
