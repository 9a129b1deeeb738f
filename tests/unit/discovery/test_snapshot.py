import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import override

import httpx
import pytest

from nilai.discovery import snapshot as snapshot_module
from nilai.discovery.base import EndpointRecord
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.protocol.models import ModelCard
from tests.support.timing import FakeClock

URL_A = "http://model-a:8000"
URL_B = "http://model-b:8000"
EJECT_S = 5.0


class ModelServers:
    """Answers /v1/models for the URLs marked up; fails the others."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.refused: set[str] = set()
        self.slow: set[str] = set()
        self.probed: list[str] = []
        self.while_probing: Callable[[str], None] = lambda _base: None
        """Runs while a probe of the given URL is in flight."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        self.probed.append(base)
        assert request.url.path == "/v1/models"
        self.while_probing(base)
        if base in self.refused:
            raise httpx.ConnectError("refused", request=request)
        if base in self.slow:
            raise httpx.ReadTimeout("slower than the probe waits", request=request)
        if base in self.down:
            return httpx.Response(500, json={"error": "down"})
        return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})


class FlakyDiscovery(MemoryDiscovery):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False
        self.lose_everything_while_listing = False
        self._lost_count = 0

    async def list(self) -> list[EndpointRecord]:
        if self.fail:
            raise ConnectionError("store down")
        if self.lose_everything_while_listing:
            self.lose_everything_while_listing = False
            self.lose_everything()
        return await super().list()

    def lose_everything(self) -> None:
        """What a Redis restart without persistence (or a flush) does to discovery."""
        self._records.clear()
        self._lost_count += 1

    @override
    async def generation(self) -> str:
        return f"{await super().generation()}-{self._lost_count}"


GRACE_S = 30.0
"""The snapshot's default grace period (NILAI_DISCOVERY_GRACE_S)."""


def _record(url: str, *models: str, registered_at: float = 1.0) -> EndpointRecord:
    cards = tuple(ModelCard(id=m, description=f"{m} at {url}") for m in models)
    return EndpointRecord(url=url, models=cards, registered_at=registered_at)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return FakeClock().install(monkeypatch, snapshot_module)


@pytest.fixture
def servers() -> ModelServers:
    return ModelServers()


@pytest.fixture
def discovery() -> FlakyDiscovery:
    return FlakyDiscovery()


@pytest.fixture
async def snapshot(
    discovery: FlakyDiscovery, servers: ModelServers
) -> AsyncIterator[DiscoverySnapshot]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(servers)) as http:
        snap = DiscoverySnapshot(discovery, http, refresh_s=60, eject_s=EJECT_S)
        yield snap
        await snap.aclose()


async def _two_endpoints(discovery: MemoryDiscovery, snapshot: DiscoverySnapshot) -> None:
    await discovery.register(_record(URL_A, "m"), 60)
    await discovery.register(_record(URL_B, "m"), 60)
    await snapshot.refresh()


def _urls(records: list[EndpointRecord]) -> list[str]:
    return [r.url for r in records]


async def test_empty_snapshot(snapshot: DiscoverySnapshot):
    await snapshot.refresh()
    assert snapshot.models() == []
    assert snapshot.card("m") is None
    assert snapshot.candidates("m") == []
    assert snapshot.healthy_models() == []
    assert snapshot.last_error is None


async def test_models_merges_cards_of_all_endpoints(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot
):
    await discovery.register(_record(URL_A, "m1", "m2"), 60)
    await discovery.register(_record(URL_B, "m2", "m3"), 60)
    await snapshot.refresh()
    ids = [card.id for card in snapshot.models()]
    assert sorted(ids) == ["m1", "m2", "m3"]
    assert len(ids) == len(set(ids))
    card = snapshot.card("m3")
    assert card is not None
    assert card.description == f"m3 at {URL_B}"
    assert snapshot.card("nope") is None
    assert _urls(snapshot.candidates("m1")) == [URL_A]
    assert sorted(_urls(snapshot.candidates("m2"))) == [URL_A, URL_B]
    assert sorted(snapshot.healthy_models()) == ["m1", "m2", "m3"]


async def test_candidates_rotate_round_robin(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot
):
    await _two_endpoints(discovery, snapshot)
    picks = [snapshot.candidates("m") for _ in range(4)]
    for pick in picks:
        assert sorted(_urls(pick)) == [URL_A, URL_B]
    firsts = [pick[0].url for pick in picks]
    assert firsts[0] != firsts[1]
    assert firsts == [firsts[0], firsts[1], firsts[0], firsts[1]]


async def test_rotation_continues_across_refresh(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot
):
    await _two_endpoints(discovery, snapshot)
    first = snapshot.candidates("m")[0].url
    await snapshot.refresh()
    assert snapshot.candidates("m")[0].url != first


async def test_report_failure_ejects_until_eject_s_passes(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, clock: FakeClock
):
    await _two_endpoints(discovery, snapshot)
    endpoint_a = _record(URL_A).id
    snapshot.report_failure(endpoint_a)
    for _ in range(3):
        assert _urls(snapshot.candidates("m")) == [URL_B]
    assert snapshot.healthy_models() == ["m"]

    snapshot.report_failure(_record(URL_B).id)
    assert snapshot.candidates("m") == []
    assert snapshot.healthy_models() == []
    assert snapshot.card("m") is not None  # still known, just unhealthy

    clock.now += EJECT_S - 0.01
    assert snapshot.candidates("m") == []
    clock.now += 0.02
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]
    assert snapshot.healthy_models() == ["m"]


async def test_report_success_restores(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, clock: FakeClock
):
    await _two_endpoints(discovery, snapshot)
    endpoint_a = _record(URL_A).id
    snapshot.report_failure(endpoint_a)
    snapshot.report_success(endpoint_a)
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]


async def test_reports_for_unknown_endpoints_are_ignored(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot
):
    await _two_endpoints(discovery, snapshot)
    snapshot.report_failure("unknown")
    snapshot.report_success("unknown")
    assert len(snapshot.candidates("m")) == 2


async def test_ejection_survives_refresh_of_same_registration(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, clock: FakeClock
):
    await _two_endpoints(discovery, snapshot)
    snapshot.report_failure(_record(URL_A).id)
    await discovery.register(_record(URL_A, "m"), 60)  # same registered_at: a lease renewal
    await snapshot.refresh()
    assert _urls(snapshot.candidates("m")) == [URL_B]


async def test_new_registration_clears_ejection_on_refresh(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, clock: FakeClock
):
    await _two_endpoints(discovery, snapshot)
    snapshot.report_failure(_record(URL_A).id)
    assert _urls(snapshot.candidates("m")) == [URL_B]
    await discovery.register(_record(URL_A, "m", registered_at=2.0), 60)
    assert _urls(snapshot.candidates("m")) == [URL_B]  # not yet refreshed
    await snapshot.refresh()
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]


async def test_refresh_drops_endpoints_that_left(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot
):
    await _two_endpoints(discovery, snapshot)
    await discovery.deregister(_record(URL_A).id)
    await snapshot.refresh()
    assert _urls(snapshot.candidates("m")) == [URL_B]
    await discovery.deregister(_record(URL_B).id)
    await snapshot.refresh()
    assert snapshot.models() == []
    assert snapshot.candidates("m") == []


async def test_probe_that_is_slow_or_answered_with_an_error_ejects_nothing(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, servers: ModelServers
):
    await _two_endpoints(discovery, snapshot)
    servers.slow.add(URL_A)  # a slow model list is a slow server, not a broken one
    servers.down.add(URL_B)  # the model list failing says nothing about chat completions
    for _ in range(5):
        await snapshot.probe()
    assert sorted(servers.probed) == [URL_A] * 5 + [URL_B] * 5
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]


async def test_probe_ejects_unreachable_endpoint(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, servers: ModelServers
):
    await _two_endpoints(discovery, snapshot)
    servers.refused.add(URL_A)
    await snapshot.probe()
    assert _urls(snapshot.candidates("m")) == [URL_B]


async def test_probe_restores_an_endpoint_that_answers_again(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, servers: ModelServers
):
    await _two_endpoints(discovery, snapshot)
    snapshot.report_failure(_record(URL_A).id)
    servers.probed.clear()
    await snapshot.probe(only_ejected=True)
    assert servers.probed == [URL_A]  # healthy endpoints are left alone
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]


@pytest.mark.parametrize("fault", ["down", "slow", "refused"])
async def test_probe_keeps_ejected_endpoint_out_while_it_fails(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, servers: ModelServers, fault: str
):
    await _two_endpoints(discovery, snapshot)
    snapshot.report_failure(_record(URL_A).id)
    getattr(servers, fault).add(URL_A)
    await snapshot.probe(only_ejected=True)
    assert _urls(snapshot.candidates("m")) == [URL_B]


async def test_unreachable_endpoint_stays_out_while_probes_cannot_connect(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, servers: ModelServers, clock: FakeClock
):
    await _two_endpoints(discovery, snapshot)
    snapshot.report_failure(_record(URL_A).id)
    servers.refused.add(URL_A)
    for _ in range(3):
        clock.now += EJECT_S - 1
        await snapshot.probe(only_ejected=True)
        assert _urls(snapshot.candidates("m")) == [URL_B]
    servers.refused.clear()
    await snapshot.probe(only_ejected=True)
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]


async def test_probe_answered_before_a_new_failure_does_not_readmit(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, servers: ModelServers, clock: FakeClock
):
    await _two_endpoints(discovery, snapshot)
    snapshot.report_failure(_record(URL_A).id)

    def request_fails_meanwhile(base: str) -> None:
        # A real request finds A unreachable while this probe (begun earlier) is in flight.
        clock.now += 0.1
        snapshot.report_failure(_record(base).id)

    servers.while_probing = request_fails_meanwhile
    await snapshot.probe(only_ejected=True)
    assert _urls(snapshot.candidates("m")) == [URL_B]


async def test_errors_eject_after_errors_to_eject_in_a_row_and_a_success_resets_them(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, clock: FakeClock
):
    await _two_endpoints(discovery, snapshot)
    endpoint_a = _record(URL_A).id
    for _ in range(snapshot_module.ERRORS_TO_EJECT - 1):
        snapshot.report_error(endpoint_a)
    snapshot.report_success(endpoint_a)
    for _ in range(snapshot_module.ERRORS_TO_EJECT - 1):
        snapshot.report_error(endpoint_a)
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]
    snapshot.report_error(endpoint_a)
    assert _urls(snapshot.candidates("m")) == [URL_B]

    # Back after the ejection, a server that fails again is out again at once.
    clock.now += EJECT_S
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]
    snapshot.report_error(endpoint_a)
    assert _urls(snapshot.candidates("m")) == [URL_B]


async def test_probe_does_not_readmit_a_server_ejected_for_failing_requests(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, servers: ModelServers, clock: FakeClock
):
    await _two_endpoints(discovery, snapshot)
    for _ in range(snapshot_module.ERRORS_TO_EJECT):
        snapshot.report_error(_record(URL_A).id)
    servers.probed.clear()
    await snapshot.probe()
    await snapshot.probe(only_ejected=True)
    # Its model list would answer, but that says nothing about chat: it sits out its ejection.
    assert servers.probed == [URL_B]
    assert _urls(snapshot.candidates("m")) == [URL_B]
    clock.now += EJECT_S
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]


async def test_background_probes_unreachable_servers_every_refresh_and_all_every_probe_s(
    discovery: FlakyDiscovery,
    servers: ModelServers,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
):
    ticks: list[float] = []

    async def one_tick(seconds: float) -> None:
        if len(ticks) == 12:
            raise asyncio.CancelledError  # enough: stop the loop
        ticks.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(
        snapshot_module, "asyncio", SimpleNamespace(sleep=one_tick, gather=asyncio.gather)
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(servers)) as http:
        snapshot = DiscoverySnapshot(discovery, http, refresh_s=1, eject_s=EJECT_S, probe_s=5)
        await _two_endpoints(discovery, snapshot)
        snapshot.report_failure(_record(URL_A).id)
        servers.refused.add(URL_A)
        with pytest.raises(asyncio.CancelledError):
            await snapshot._probe_loop()  # pyright: ignore[reportPrivateUsage]
    assert ticks == [1] * 12
    assert servers.probed.count(URL_A) == 12  # unreachable: every refresh, kept out meanwhile
    assert servers.probed.count(URL_B) == 2  # in rotation: at 5 s and 10 s
    assert _urls(snapshot.candidates("m")) == [URL_B]


async def test_refresh_keeps_last_snapshot_when_discovery_fails(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, clock: FakeClock
):
    await _two_endpoints(discovery, snapshot)
    snapshot.report_failure(_record(URL_A).id)
    discovery.fail = True
    await snapshot.refresh()
    assert snapshot.last_error == "ConnectionError"
    assert [card.id for card in snapshot.models()] == ["m"]
    assert _urls(snapshot.candidates("m")) == [URL_B]  # failure state kept too

    discovery.fail = False
    await discovery.deregister(_record(URL_B).id)
    await snapshot.refresh()
    assert snapshot.last_error is None
    assert [card.id for card in snapshot.models()] == ["m"]
    assert snapshot.candidates("m") == []  # only A is left, and it is still ejected
    clock.now += EJECT_S
    assert _urls(snapshot.candidates("m")) == [URL_A]


async def test_start_loads_and_keeps_refreshing(servers: ModelServers):
    discovery = MemoryDiscovery()
    await discovery.register(_record(URL_A, "m1"), 60)
    async with httpx.AsyncClient(transport=httpx.MockTransport(servers)) as http:
        snapshot = DiscoverySnapshot(discovery, http, refresh_s=0.01, eject_s=EJECT_S)
        await snapshot.start()
        try:
            assert [card.id for card in snapshot.models()] == ["m1"]
            await discovery.register(_record(URL_B, "m2"), 60)
            for _ in range(100):
                if snapshot.card("m2") is not None:
                    break
                await asyncio.sleep(0.005)
            assert snapshot.card("m2") is not None
        finally:
            await snapshot.aclose()


# --- what vanished from discovery: a Redis restart, a server that left ----------------------


def _ids(snapshot: DiscoverySnapshot) -> list[str]:
    return sorted(card.id for card in snapshot.models())


async def test_model_whose_servers_left_is_vanished_not_unknown_for_the_grace_period(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, clock: FakeClock
):
    await discovery.register(_record(URL_A, "m", "other"), 60)
    await discovery.register(_record(URL_B, "other"), 60)
    await snapshot.refresh()
    await discovery.deregister(_record(URL_A).id)
    await snapshot.refresh()

    # Not routed and not listed: /v1/models lists what can be used now ...
    assert snapshot.card("m") is None
    assert snapshot.candidates("m") == []
    assert _ids(snapshot) == ["other"]
    # ... but a request for it is worth retrying, unlike one for a model never served here.
    assert snapshot.vanished_recently("m")
    assert not snapshot.vanished_recently("other")  # still served
    assert not snapshot.vanished_recently("never-served")

    clock.now += GRACE_S - 0.01
    assert snapshot.vanished_recently("m")
    clock.now += 0.02
    assert not snapshot.vanished_recently("m")
    await snapshot.refresh()
    assert not snapshot.vanished_recently("m")


async def test_model_that_comes_back_is_served_and_no_longer_vanished(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, clock: FakeClock
):
    await discovery.register(_record(URL_A, "m"), 60)
    await snapshot.refresh()
    await discovery.deregister(_record(URL_A).id)
    await snapshot.refresh()
    assert snapshot.vanished_recently("m")
    await discovery.register(_record(URL_A, "m", registered_at=2.0), 60)
    await snapshot.refresh()
    assert snapshot.card("m") is not None
    assert not snapshot.vanished_recently("m")
    await discovery.deregister(_record(URL_A).id)  # and it leaves again: a new grace period
    clock.now += GRACE_S - 1
    await snapshot.refresh()
    clock.now += 2
    assert snapshot.vanished_recently("m")


async def test_servers_stay_in_use_when_discovery_loses_every_registration(
    discovery: FlakyDiscovery,
    snapshot: DiscoverySnapshot,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
):
    await discovery.register(_record(URL_A, "m", "a-only"), 60)
    await discovery.register(_record(URL_B, "m"), 60)
    await snapshot.refresh()
    snapshot.report_failure(_record(URL_B).id)

    discovery.lose_everything()  # Redis restarted empty; the model servers did not move
    with caplog.at_level(logging.INFO, logger="nilai.discovery.snapshot"):
        await snapshot.refresh()
    assert "discovery lost every registration" in caplog.text
    assert _ids(snapshot) == ["a-only", "m"]
    assert _urls(snapshot.candidates("m")) == [URL_A]  # B is still ejected
    assert _urls(snapshot.candidates("a-only")) == [URL_A]
    assert not snapshot.vanished_recently("m")

    # A announces again; B not yet, so it is still carried over.
    await discovery.register(_record(URL_A, "m", "a-only"), 60)
    clock.now += EJECT_S
    await snapshot.refresh()
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]

    # B never comes back: after the grace period, discovery alone decides again.
    clock.now += GRACE_S
    with caplog.at_level(logging.INFO, logger="nilai.discovery.snapshot"):
        await snapshot.refresh()
    assert _urls(snapshot.candidates("m")) == [URL_A]
    assert "1 model servers known before discovery lost its data did not announce" in caplog.text


async def test_server_announced_again_after_lost_registrations_can_still_be_withdrawn(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot
):
    await _two_endpoints(discovery, snapshot)
    discovery.lose_everything()
    await snapshot.refresh()
    await discovery.register(_record(URL_A, "m"), 60)
    await discovery.register(_record(URL_B, "m"), 60)
    await snapshot.refresh()
    await discovery.deregister(_record(URL_B).id)  # withdrawn on purpose, the store intact
    await snapshot.refresh()
    assert _urls(snapshot.candidates("m")) == [URL_A]


async def test_registrations_lost_during_a_listing_are_detected(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot
):
    await _two_endpoints(discovery, snapshot)
    discovery.lose_everything_while_listing = True
    await snapshot.refresh()
    assert sorted(_urls(snapshot.candidates("m"))) == [URL_A, URL_B]


async def test_servers_that_leave_while_discovery_is_intact_are_dropped_at_once(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot
):
    await _two_endpoints(discovery, snapshot)
    await discovery.deregister(_record(URL_A).id)
    await discovery.deregister(_record(URL_B).id)
    await snapshot.refresh()
    assert snapshot.candidates("m") == []
    assert snapshot.models() == []


async def test_discovery_outage_is_logged_once_with_its_cause_and_once_when_it_ends(
    discovery: FlakyDiscovery, snapshot: DiscoverySnapshot, caplog: pytest.LogCaptureFixture
):
    await _two_endpoints(discovery, snapshot)
    discovery.fail = True
    with caplog.at_level(logging.INFO, logger="nilai.discovery.snapshot"):
        for _ in range(5):
            await snapshot.refresh()
        discovery.fail = False
        await snapshot.refresh()
        await snapshot.refresh()
    lines = [record.getMessage() for record in caplog.records]
    down = [line for line in lines if "unavailable" in line]
    assert down == [
        "discovery (in-process) unavailable (ConnectionError: store down); "
        "routing with the last servers it listed until it answers"
    ]
    back = [line for line in lines if "available again" in line]
    assert len(back) == 1
    assert "(5 failed attempts)" in back[0]
