import pytest

from nilai.discovery import memory as memory_module
from nilai.discovery.base import EndpointRecord, endpoint_id
from nilai.discovery.memory import MemoryDiscovery
from nilai.protocol.models import ModelCard
from tests.support.timing import FakeClock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The clock leases expire on, moved by the test."""
    return FakeClock().install(monkeypatch, memory_module)


def _record(url: str, *models: str, registered_at: float = 1.0) -> EndpointRecord:
    cards = tuple(ModelCard(id=m) for m in models or ("m",))
    return EndpointRecord(url=url, models=cards, registered_at=registered_at)


def test_endpoint_id_is_stable_and_ignores_trailing_slash():
    assert endpoint_id("http://a:8000") == endpoint_id("http://a:8000/")
    assert endpoint_id("http://a:8000") != endpoint_id("http://b:8000")
    assert len(endpoint_id("http://a")) == 16
    assert _record("http://a").id == endpoint_id("http://a")


async def test_register_and_list():
    discovery = MemoryDiscovery()
    assert await discovery.list() == []
    first, second = _record("http://a", "m1"), _record("http://b", "m1", "m2")
    await discovery.register(first, 10)
    await discovery.register(second, 10)
    assert await discovery.list() == [first, second]


async def test_register_replaces_the_record():
    discovery = MemoryDiscovery()
    await discovery.register(_record("http://a", "old"), 10)
    newer = _record("http://a", "new", registered_at=2.0)
    await discovery.register(newer, 10)
    assert await discovery.list() == [newer]


async def test_heartbeat_renews_a_live_lease(clock: FakeClock):
    discovery = MemoryDiscovery()
    record = _record("http://a")
    await discovery.register(record, 5)
    clock.advance(4)
    assert await discovery.heartbeat(record.id, 10) is True
    clock.advance(9)  # 13 s after registering: alive only thanks to the heartbeat
    assert await discovery.list() == [record]
    clock.advance(1)  # 10 s after the heartbeat
    assert await discovery.list() == []


async def test_heartbeat_of_unknown_endpoint_is_false():
    assert await MemoryDiscovery().heartbeat("nope", 10) is False


async def test_lease_expires(clock: FakeClock):
    discovery = MemoryDiscovery()
    short, long = _record("http://a"), _record("http://b")
    await discovery.register(short, 5)
    await discovery.register(long, 10)
    clock.advance(4.9)
    assert await discovery.list() == [short, long]
    clock.advance(0.1)
    assert await discovery.list() == [long]


async def test_heartbeat_on_expired_lease_is_false_and_does_not_revive(clock: FakeClock):
    discovery = MemoryDiscovery()
    record = _record("http://a")
    await discovery.register(record, 5)
    clock.advance(5)
    assert await discovery.heartbeat(record.id, 10) is False
    assert await discovery.list() == []
    await discovery.register(record, 10)
    assert await discovery.list() == [record]


async def test_deregister():
    discovery = MemoryDiscovery()
    first, second = _record("http://a"), _record("http://b")
    await discovery.register(first, 10)
    await discovery.register(second, 10)
    await discovery.deregister(first.id)
    assert await discovery.list() == [second]
    assert await discovery.heartbeat(first.id, 10) is False
    await discovery.deregister(first.id)  # absent: no error
    await discovery.deregister("unknown")
    assert await discovery.list() == [second]


async def test_ping_answers_without_touching_the_records(clock: FakeClock):
    # Readiness pings discovery on every probe: a ping must neither fail, forget endpoints,
    # nor renew their leases.
    discovery = MemoryDiscovery()
    record = _record("http://a")
    await discovery.register(record, 10)
    await discovery.ping()
    assert await discovery.list() == [record]
    clock.advance(9)
    await discovery.ping()
    clock.advance(1)
    assert await discovery.list() == []
    await discovery.aclose()
