"""What a dispatched request tells the routing snapshot: which failures eject a model server."""

import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from nilai.discovery import snapshot as snapshot_module
from nilai.discovery.base import EndpointRecord, endpoint_id
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import InvalidRequest, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from nilai.gateway.chat.dispatch import RESPONSES_PATH, Dispatcher
from nilai.protocol.models import ModelCard
from nilai.upstream.client import HttpxUpstream, UpstreamResponse

URL_A = "http://model-a:8000"
URL_B = "http://model-b:8000"
PAYLOAD = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
COMPLETION = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}

Answer = Callable[[httpx.Request], httpx.Response]


class ModelServers:
    """Each URL answers chat requests with what the test chose (200 unless told otherwise)."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        self.requests.append(base)
        answer = self.answers.get(base)
        return answer(request) if answer else httpx.Response(200, json=COMPLETION)


def _raises(error: type[httpx.TransportError]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise error("injected", request=request)

    return answer


def _status(status: int) -> Answer:
    return lambda _request: httpx.Response(status, json={"error": {"message": "injected"}})


@pytest.fixture
def servers() -> ModelServers:
    return ModelServers()


@pytest.fixture
async def snapshot(servers: ModelServers) -> AsyncIterator[DiscoverySnapshot]:
    discovery = MemoryDiscovery()
    for url in (URL_A, URL_B):
        card = ModelCard(id="m", description="m")
        await discovery.register(EndpointRecord(url=url, models=(card,), registered_at=1.0), 60)
    async with httpx.AsyncClient(transport=httpx.MockTransport(servers)) as http:
        snap = DiscoverySnapshot(discovery, http, refresh_s=60, eject_s=60)
        await snap.refresh()
        yield snap


@pytest.fixture
async def dispatcher(
    snapshot: DiscoverySnapshot, servers: ModelServers
) -> AsyncIterator[Dispatcher]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(servers)) as http:
        yield Dispatcher(HttpxUpstream(http), snapshot)


def _in_rotation(snapshot: DiscoverySnapshot) -> list[str]:
    return sorted(record.url for record in snapshot.candidates("m"))


async def _send(dispatcher: Dispatcher) -> UpstreamResponse:
    return await (await dispatcher.send("m", PAYLOAD, stream=False)).ok()


async def test_a_full_local_connection_pool_answers_503_and_ejects_no_model_server(
    dispatcher: Dispatcher, snapshot: DiscoverySnapshot, servers: ModelServers
):
    servers.answers[URL_A] = servers.answers[URL_B] = _raises(httpx.PoolTimeout)
    for _ in range(5):
        with pytest.raises(UpstreamUnavailable) as refused:
            await _send(dispatcher)
        assert refused.value.code == "upstream_busy"
        assert refused.value.headers["Retry-After"] == "1"
    assert _in_rotation(snapshot) == [URL_A, URL_B]
    servers.answers.clear()
    assert (await _send(dispatcher)).status == 200


async def test_a_refused_connection_ejects_the_server_and_fails_over(
    dispatcher: Dispatcher, snapshot: DiscoverySnapshot, servers: ModelServers
):
    servers.answers[URL_A] = _raises(httpx.ConnectError)
    for _ in range(3):
        answer = await dispatcher.send("m", PAYLOAD, stream=False)
        assert answer.response.status == 200
        assert answer.endpoint == endpoint_id(URL_B)
    assert _in_rotation(snapshot) == [URL_B]
    assert servers.requests.count(URL_A) == 1  # tried once, then out of rotation


async def test_a_connect_timeout_ejects_the_server(
    dispatcher: Dispatcher, snapshot: DiscoverySnapshot, servers: ModelServers
):
    servers.answers[URL_A] = servers.answers[URL_B] = _raises(httpx.ConnectTimeout)
    with pytest.raises(UpstreamUnavailable) as refused:
        await _send(dispatcher)
    assert refused.value.code == "model_unavailable"
    assert _in_rotation(snapshot) == []


@pytest.mark.parametrize(
    "failure",
    [_status(500), _status(502), _status(504), _raises(httpx.RemoteProtocolError)],
    ids=["500", "502", "504", "broken-connection"],
)
async def test_a_server_failing_requests_in_a_row_is_ejected(
    dispatcher: Dispatcher, snapshot: DiscoverySnapshot, servers: ModelServers, failure: Answer
):
    servers.answers[URL_A] = servers.answers[URL_B] = failure
    # Taken in turn: each server fails one request short of the habit.
    for _ in range(2 * (snapshot_module.ERRORS_TO_EJECT - 1)):
        with pytest.raises(UpstreamProtocolError):
            await _send(dispatcher)
    assert _in_rotation(snapshot) == [URL_A, URL_B]
    with pytest.raises(UpstreamProtocolError):
        await _send(dispatcher)
    assert len(_in_rotation(snapshot)) == 1
    with pytest.raises(UpstreamProtocolError):
        await _send(dispatcher)
    assert _in_rotation(snapshot) == []
    with pytest.raises(UpstreamUnavailable):
        await _send(dispatcher)


async def test_one_proper_answer_between_failures_keeps_the_server_in_rotation(
    dispatcher: Dispatcher, snapshot: DiscoverySnapshot, servers: ModelServers
):
    snapshot.report_failure(endpoint_id(URL_B))  # every request to A
    for proper_answer in (_status(400), _status(200)):
        for _ in range(3):
            servers.answers[URL_A] = _status(500)
            for _ in range(snapshot_module.ERRORS_TO_EJECT - 1):
                with pytest.raises(UpstreamProtocolError):
                    await _send(dispatcher)
            # A refused request is an answer too: the server works, the request was wrong.
            servers.answers[URL_A] = proper_answer
            with contextlib.suppress(InvalidRequest):
                await _send(dispatcher)
    assert _in_rotation(snapshot) == [URL_A]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_status(503), UpstreamUnavailable),
        (_status(429), UpstreamUnavailable),
        (_raises(httpx.ReadTimeout), UpstreamTimeout),
    ],
    ids=["503-overloaded", "429-overloaded", "slow"],
)
async def test_an_overloaded_or_slow_server_is_never_ejected(
    dispatcher: Dispatcher,
    snapshot: DiscoverySnapshot,
    servers: ModelServers,
    answer: Answer,
    error: type[Exception],
):
    servers.answers[URL_A] = servers.answers[URL_B] = answer
    for _ in range(4 * snapshot_module.ERRORS_TO_EJECT):
        with pytest.raises(error):
            await _send(dispatcher)
    assert _in_rotation(snapshot) == [URL_A, URL_B]


async def test_a_full_connection_pool_is_logged_once_and_once_when_it_frees(
    dispatcher: Dispatcher, servers: ModelServers, caplog: pytest.LogCaptureFixture
):
    servers.answers[URL_A] = servers.answers[URL_B] = _raises(httpx.PoolTimeout)
    with caplog.at_level("INFO", logger="nilai.gateway.chat.dispatch"):
        for _ in range(5):
            with pytest.raises(UpstreamUnavailable):
                await _send(dispatcher)
        servers.answers.clear()
        await _send(dispatcher)
        await _send(dispatcher)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("the upstream connection pool (NILAI_UPSTREAM_MAX_CONNECTIONS) ")
    assert "ejecting no model server" in lines[0]
    assert "available again" in lines[1]


async def test_a_responses_request_goes_to_the_servers_responses_path(
    dispatcher: Dispatcher, servers: ModelServers
):
    paths: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, json={"object": "response", "output": []})

    servers.answers = {URL_A: answer, URL_B: answer}
    sent = await dispatcher.send("m", PAYLOAD, stream=False, path=RESPONSES_PATH)
    await sent.response.aclose()
    await _send(dispatcher)  # chat, by default
    assert paths == ["/v1/responses", "/v1/chat/completions"]
