"""The /readyz pings: one run at a time for every caller, reused for a second."""

import asyncio

import pytest

from nilai.gateway import readiness as readiness_module
from nilai.gateway.readiness import MAX_AGE_S, SharedChecks
from tests.support.timing import FakeClock


class Dependency:
    """A ping that counts its calls and can be held open or made to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()
        self.error: Exception | None = None

    async def ping(self) -> None:
        self.calls += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return FakeClock().install(monkeypatch, readiness_module)


async def test_callers_at_the_same_time_share_one_run(clock: FakeClock):
    database, redis = Dependency(), Dependency()
    checks = SharedChecks({"database": database.ping, "redis": redis.ping})
    database.release.clear()
    callers = [asyncio.create_task(checks.results()) for _ in range(200)]
    await asyncio.sleep(0)
    database.release.set()
    results = await asyncio.gather(*callers)
    assert results == [{"database": "ok", "redis": "ok"}] * 200
    assert (database.calls, redis.calls, checks.runs) == (1, 1, 1)


async def test_a_result_is_reused_for_max_age_then_checked_again(clock: FakeClock):
    database = Dependency()
    checks = SharedChecks({"database": database.ping})
    for _ in range(1000):
        assert await checks.results() == {"database": "ok"}
    assert database.calls == 1
    clock.now += MAX_AGE_S - 0.01
    database.error = ConnectionError("down")
    assert await checks.results() == {"database": "ok"}
    clock.now += 0.02
    assert await checks.results() == {"database": "unreachable (ConnectionError)"}
    assert database.calls == 2


async def test_a_ping_that_hangs_reads_as_unreachable(clock: FakeClock):
    database, redis = Dependency(), Dependency()
    redis.release.clear()
    checks = SharedChecks({"database": database.ping, "redis": redis.ping}, timeout_s=0.01)
    assert await checks.results() == {"database": "ok", "redis": "unreachable (TimeoutError)"}


async def test_a_caller_that_leaves_does_not_cancel_the_run_others_wait_for(clock: FakeClock):
    database = Dependency()
    database.release.clear()
    checks = SharedChecks({"database": database.ping})
    leaving = asyncio.create_task(checks.results())
    staying = asyncio.create_task(checks.results())
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    database.release.set()
    assert await staying == {"database": "ok"}
    assert leaving.cancelled()
    assert database.calls == 1


async def test_callers_cannot_change_the_shared_result(clock: FakeClock):
    checks = SharedChecks({"database": Dependency().ping})
    first = await checks.results()
    first["models"] = "changed by a caller"
    assert await checks.results() == {"database": "ok"}
