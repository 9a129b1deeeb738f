import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from nilai.discovery import announcer as announcer_module
from nilai.discovery.announcer import (
    FAILURES_BEFORE_WITHDRAW,
    Announcer,
    ModelOverrides,
    fetch_models,
)
from nilai.discovery.base import EndpointRecord, endpoint_id
from nilai.discovery.memory import MemoryDiscovery
from nilai.protocol.models import ModelCard

URL = "http://vllm-1:8000"


def _vllm_entry(model_id: str, max_len: int = 8192) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 1718000000,
        "owned_by": "vllm",
        "root": f"/models/{model_id}",
        "parent": None,
        "max_model_len": max_len,
        "permission": [{"id": "modelperm-1", "allow_sampling": True}],
    }


class ModelServer:
    def __init__(self) -> None:
        self.up = True
        self.entries = [_vllm_entry("meta-llama/Llama-3.1-8B-Instruct")]
        self.requests: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        if not self.up:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"object": "list", "data": self.entries})


class RecordingDiscovery(MemoryDiscovery):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.fail_register = False
        self.fail_heartbeat = False

    async def register(self, record: EndpointRecord, ttl_s: float) -> None:
        self.calls.append("register")
        if self.fail_register:
            raise ConnectionError("store down")
        await super().register(record, ttl_s)

    async def heartbeat(self, endpoint: str, ttl_s: float) -> bool:
        self.calls.append("heartbeat")
        if self.fail_heartbeat:
            raise ConnectionError("store down")
        return await super().heartbeat(endpoint, ttl_s)

    async def deregister(self, endpoint: str) -> None:
        self.calls.append("deregister")
        await super().deregister(endpoint)


@pytest.fixture
def server() -> ModelServer:
    return ModelServer()


@pytest.fixture
def discovery() -> RecordingDiscovery:
    return RecordingDiscovery()


@pytest.fixture
def wall_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    ticks = itertools.count(1000)
    monkeypatch.setattr(announcer_module, "time", SimpleNamespace(time=lambda: float(next(ticks))))
    return ticks


@pytest.fixture
async def http(server: ModelServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as client:
        yield client


# --- fetch_models ---------------------------------------------------------------------------


async def test_fetch_models_maps_vllm_entries(http: httpx.AsyncClient, server: ModelServer):
    server.entries = [_vllm_entry("a/one", 4096), _vllm_entry("b/two", 32768)]
    cards = await fetch_models(http, URL, ModelOverrides())
    assert server.requests == [f"{URL}/v1/models"]
    assert [card.id for card in cards] == ["a/one", "b/two"]
    one = cards[0]
    assert one.max_model_len == 4096
    assert one.name == "a/one"
    assert one.owned_by == "vllm"
    assert one.created == 1718000000
    assert one.tool_support is False
    assert one.multimodal_support is False
    assert cards[1].max_model_len == 32768


async def test_fetch_models_keeps_given_name_and_ignores_nulls(
    http: httpx.AsyncClient, server: ModelServer
):
    server.entries = [{"id": "m", "name": "Nice Name", "max_model_len": None, "owned_by": None}]
    (card,) = await fetch_models(http, URL, ModelOverrides())
    assert card.name == "Nice Name"
    assert card.max_model_len is None
    assert card.owned_by == "nilai"


async def test_fetch_models_applies_overrides(http: httpx.AsyncClient, server: ModelServer):
    overrides = ModelOverrides(
        tool_support=True, multimodal_support=True, max_model_len=1024, description="fast"
    )
    (card,) = await fetch_models(http, URL, overrides)
    assert card.tool_support is True
    assert card.multimodal_support is True
    assert card.max_model_len == 1024
    assert card.description == "fast"
    assert card.id == "meta-llama/Llama-3.1-8B-Instruct"


def test_unset_overrides_change_nothing():
    card = ModelCard(id="m", max_model_len=10, tool_support=True, description="d")
    assert ModelOverrides().apply(card) == card
    assert ModelOverrides(tool_support=False).apply(card).tool_support is False


def test_features_are_added_once_to_what_the_server_lists():
    card = ModelCard(id="m")
    assert not card.responses_support
    with_responses = ModelOverrides(features=("responses",)).apply(card)
    assert with_responses.supported_features == ["chat_completion", "responses"]
    assert with_responses.responses_support
    again = ModelOverrides(features=("responses",)).apply(with_responses)
    assert again.supported_features == ["chat_completion", "responses"]


@pytest.mark.parametrize(
    "body",
    [
        {"object": "list", "data": []},
        {"object": "list"},
        {"data": "nope"},
        [{"id": "m"}],
    ],
)
async def test_fetch_models_rejects_empty_or_malformed_lists(body: Any):
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ValueError, match="lists no models"):
            await fetch_models(client, URL, ModelOverrides())


@pytest.mark.parametrize("entry", [{"object": "model"}, {"id": 5}, "m", None])
async def test_fetch_models_rejects_entries_without_id(entry: Any):
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [entry]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ValueError, match="model entry"):
            await fetch_models(client, URL, ModelOverrides())


async def test_fetch_models_raises_on_http_error():
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(httpx.HTTPStatusError):
            await fetch_models(client, URL, ModelOverrides())


# --- Announcer ------------------------------------------------------------------------------


async def test_tick_registers_the_server_with_its_models(
    http: httpx.AsyncClient, discovery: RecordingDiscovery, wall_clock: Any
):
    announcer = Announcer(
        discovery, http, URL + "/", ttl_s=10, overrides=ModelOverrides(tool_support=True)
    )
    assert announcer.url == URL
    assert not announcer.registered
    await announcer.tick()
    assert announcer.registered
    (record,) = await discovery.list()
    assert record.url == URL
    assert record.id == endpoint_id(URL)
    assert record.registered_at == 1000.0
    (card,) = record.models
    assert card.id == "meta-llama/Llama-3.1-8B-Instruct"
    assert card.max_model_len == 8192
    assert card.tool_support is True
    assert discovery.calls == ["register"]


async def test_second_tick_heartbeats(
    http: httpx.AsyncClient, discovery: RecordingDiscovery, wall_clock: Any
):
    announcer = Announcer(discovery, http, URL, ttl_s=10)
    await announcer.tick()
    await announcer.tick()
    await announcer.tick()
    assert discovery.calls == ["register", "heartbeat", "heartbeat"]
    (record,) = await discovery.list()
    assert record.registered_at == 1000.0


async def test_changed_models_are_registered_again_with_same_registration_time(
    http: httpx.AsyncClient, discovery: RecordingDiscovery, server: ModelServer, wall_clock: Any
):
    announcer = Announcer(discovery, http, URL, ttl_s=10)
    await announcer.tick()
    server.entries = [_vllm_entry("other/model")]
    await announcer.tick()
    assert discovery.calls == ["register", "register"]
    (record,) = await discovery.list()
    assert [m.id for m in record.models] == ["other/model"]
    assert record.registered_at == 1000.0


async def test_expired_lease_is_registered_again(
    http: httpx.AsyncClient, discovery: RecordingDiscovery, wall_clock: Any
):
    announcer = Announcer(discovery, http, URL, ttl_s=10)
    await announcer.tick()
    await discovery.deregister(endpoint_id(URL))  # as if the lease had run out
    discovery.calls.clear()
    await announcer.tick()
    assert discovery.calls == ["heartbeat", "register"]
    (record,) = await discovery.list()
    assert record.url == URL


async def test_two_failing_ticks_withdraw_and_recovery_registers_afresh(
    http: httpx.AsyncClient, discovery: RecordingDiscovery, server: ModelServer, wall_clock: Any
):
    assert FAILURES_BEFORE_WITHDRAW == 2
    announcer = Announcer(discovery, http, URL, ttl_s=10)
    await announcer.tick()
    first = (await discovery.list())[0].registered_at

    server.up = False
    await announcer.tick()
    assert announcer.registered  # one failure is tolerated
    assert len(await discovery.list()) == 1
    await announcer.tick()
    assert not announcer.registered
    assert await discovery.list() == []
    assert discovery.calls == ["register", "deregister"]

    await announcer.tick()  # still down: nothing more to withdraw
    assert discovery.calls == ["register", "deregister"]

    server.up = True
    await announcer.tick()
    assert announcer.registered
    (record,) = await discovery.list()
    assert record.registered_at > first


async def test_a_single_failure_between_successes_does_not_withdraw(
    http: httpx.AsyncClient, discovery: RecordingDiscovery, server: ModelServer
):
    announcer = Announcer(discovery, http, URL, ttl_s=10)
    await announcer.tick()
    for _ in range(3):
        server.up = False
        await announcer.tick()
        server.up = True
        await announcer.tick()
    assert announcer.registered
    assert "deregister" not in discovery.calls


async def test_failures_before_registration_do_nothing(
    http: httpx.AsyncClient, discovery: RecordingDiscovery, server: ModelServer
):
    server.up = False
    announcer = Announcer(discovery, http, URL, ttl_s=10)
    for _ in range(3):
        await announcer.tick()
    assert not announcer.registered
    assert discovery.calls == []


async def test_empty_model_list_counts_as_failure(
    http: httpx.AsyncClient, discovery: RecordingDiscovery, server: ModelServer
):
    announcer = Announcer(discovery, http, URL, ttl_s=10)
    await announcer.tick()
    server.entries = []
    await announcer.tick()
    await announcer.tick()
    assert not announcer.registered
    assert await discovery.list() == []


async def test_withdraw(http: httpx.AsyncClient, discovery: RecordingDiscovery):
    announcer = Announcer(discovery, http, URL, ttl_s=10)
    await announcer.tick()
    await announcer.withdraw()
    assert not announcer.registered
    assert await discovery.list() == []


async def _wait_for(condition: Any, timeout_s: float = 0.3) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if await condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


async def test_run_announces_then_withdraws_on_stop(
    http: httpx.AsyncClient, discovery: RecordingDiscovery
):
    announcer = Announcer(discovery, http, URL, ttl_s=0.06)
    stop = asyncio.Event()
    task = asyncio.create_task(announcer.run(stop))

    async def announced() -> bool:
        return "heartbeat" in discovery.calls and len(await discovery.list()) == 1

    await _wait_for(announced)
    stop.set()
    await asyncio.wait_for(task, timeout=1)
    assert not announcer.registered
    assert await discovery.list() == []
    assert discovery.calls[-1] == "deregister"


async def test_run_survives_discovery_outages(
    http: httpx.AsyncClient, discovery: RecordingDiscovery
):
    discovery.fail_register = True
    announcer = Announcer(discovery, http, URL, ttl_s=0.03)
    stop = asyncio.Event()
    task = asyncio.create_task(announcer.run(stop))

    async def retried() -> bool:
        return discovery.calls.count("register") >= 2

    await _wait_for(retried)
    discovery.fail_register = False

    async def announced() -> bool:
        return len(await discovery.list()) == 1

    await _wait_for(announced)
    stop.set()
    await asyncio.wait_for(task, timeout=1)
    assert await discovery.list() == []


# A lease of 30 s is renewed every 10 s; these tests wait 3 s at most for what must come sooner.
LONG_TTL_S = 30.0
PROMPTLY_S = 3.0


async def test_run_registers_again_promptly_once_discovery_answers_after_failing(
    http: httpx.AsyncClient, discovery: RecordingDiscovery
):
    discovery.fail_register = True
    announcer = Announcer(discovery, http, URL, ttl_s=LONG_TTL_S)
    stop = asyncio.Event()
    task = asyncio.create_task(announcer.run(stop))
    try:

        async def tried() -> bool:
            return discovery.calls.count("register") >= 1

        await _wait_for(tried)
        discovery.fail_register = False  # Redis answers again

        async def announced() -> bool:
            return len(await discovery.list()) == 1

        await _wait_for(announced, timeout_s=PROMPTLY_S)  # not a third of the lease later
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def test_registration_lost_in_a_redis_restart_is_renewed_on_the_first_tick_it_answers(
    http: httpx.AsyncClient, discovery: RecordingDiscovery
):
    announcer = Announcer(discovery, http, URL, ttl_s=LONG_TTL_S)
    await announcer.tick()
    discovery.fail_heartbeat = True  # Redis is down ...
    stop = asyncio.Event()
    task = asyncio.create_task(announcer.run(stop))
    try:

        async def failed() -> bool:
            return discovery.calls.count("heartbeat") >= 1

        await _wait_for(failed)
        await discovery.deregister(endpoint_id(URL))  # ... and comes back empty
        discovery.calls.clear()
        discovery.fail_heartbeat = False

        async def announced() -> bool:
            return len(await discovery.list()) == 1

        await _wait_for(announced, timeout_s=PROMPTLY_S)
        assert discovery.calls[:2] == ["heartbeat", "register"]  # heartbeat False: register
        (record,) = await discovery.list()
        assert record.url == URL
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def test_discovery_outage_is_logged_once_with_its_cause_and_once_when_it_ends(
    http: httpx.AsyncClient, discovery: RecordingDiscovery, caplog: pytest.LogCaptureFixture
):
    discovery.fail_register = True
    announcer = Announcer(discovery, http, URL, ttl_s=LONG_TTL_S, retry_s=0.01)
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="nilai.discovery.announcer"):
        task = asyncio.create_task(announcer.run(stop))

        async def retried() -> bool:
            return discovery.calls.count("register") >= 5

        await _wait_for(retried)
        discovery.fail_register = False

        async def announced() -> bool:
            return len(await discovery.list()) == 1

        await _wait_for(announced)
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    lines = [record.getMessage() for record in caplog.records]
    down = [line for line in lines if "unavailable" in line]
    assert down == [
        f"discovery (in-process) for {URL} unavailable (ConnectionError: store down); "
        "trying again every 0.01 s"
    ]
    back = [line for line in lines if "available again" in line]
    assert len(back) == 1
    assert back[0].startswith(f"discovery (in-process) for {URL} available again after ")
