"""The chat service's web search stage, with in-memory search and pages and a mock model server.

The model server answers the planner's call (recognised by its instructions) with a plan, and
the answer with fixed text; both report usage, so the sums the client and the query log get can
be checked exactly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Message

from nilai.auth.base import Principal
from nilai.context.search.pages import MemoryPageFetcher
from nilai.context.search.planner import PLANNER_INSTRUCTIONS
from nilai.context.search.provider import MemorySearch, SearchResult
from nilai.context.search.service import WebSearch
from nilai.crypto.keys import Signer
from nilai.crypto.verify import VerificationError, verify_response, verify_stream
from nilai.discovery.base import EndpointRecord
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import ContextUnavailable
from nilai.gateway.chat.context import RequestContext
from nilai.gateway.chat.service import ChatService
from nilai.gateway.disconnect import ClientGone
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import Metrics
from nilai.limits.memory import MemoryConcurrencyLimiter, MemoryRateLimiter
from nilai.limits.policy import Admission, LimitDefaults
from nilai.protocol.chat import ChatCompletionRequest
from nilai.protocol.models import ModelCard
from nilai.upstream.client import HttpxUpstream
from nilai.upstream.sse import DONE, frame
from tests.support.records import ListSink

PLAN = {"topics": [{"topic": "t1", "query": "lighthouse"}, {"topic": "t2", "query": "otters"}]}
PLANNER_USAGE = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}
ANSWER_USAGE = {"prompt_tokens": 300, "completion_tokens": 5, "total_tokens": 305}
LIGHTHOUSE = SearchResult("Lighthouse", "https://a.example/lighthouse", "lighthouse snippet")
OTTERS = SearchResult("Otters", "https://b.example/otters", "otter snippet")
PAGES = {LIGHTHOUSE.url: "The keeper counted 412 ships."}
USER = {"role": "user", "content": "What did the keeper count?"}


def _is_planner(body: dict[str, Any]) -> bool:
    first = body["messages"][0]
    return first["role"] == "system" and first["content"].startswith(PLANNER_INSTRUCTIONS[:30])


@dataclass
class ModelServer:
    """Answers planner calls with ``plan`` (or ``planner_status``) and chats with fixed text."""

    plan: str = json.dumps(PLAN)
    planner_status: int = 200
    bodies: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if _is_planner(body):
            if self.planner_status != 200:
                return httpx.Response(self.planner_status, json={"error": {"message": "down"}})
            return httpx.Response(200, json=_completion(self.plan, PLANNER_USAGE))
        if body.get("stream"):
            chunks = [
                _chunk({"role": "assistant", "content": "412"}, None),
                _chunk({}, "stop"),
                {**_chunk({}, None), "choices": [], "usage": ANSWER_USAGE},
            ]
            events = b"".join(frame(json.dumps(c).encode()) for c in chunks) + frame(DONE)
            return httpx.Response(
                200, stream=httpx.ByteStream(events), headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(200, json=_completion("412 ships.", ANSWER_USAGE))

    @property
    def answers(self) -> list[dict[str, Any]]:
        """The chat requests that were not planner calls."""
        return [body for body in self.bodies if not _is_planner(body)]

    @property
    def planner_calls(self) -> list[dict[str, Any]]:
        """The planner's calls."""
        return [body for body in self.bodies if _is_planner(body)]


def _completion(text: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": dict(usage),
    }


def _chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


@dataclass
class World:
    service: ChatService
    server: ModelServer
    provider: MemorySearch
    sink: ListSink


@pytest.fixture
def server() -> ModelServer:
    return ModelServer()


@pytest.fixture
def provider() -> MemorySearch:
    return MemorySearch({"lighthouse": [LIGHTHOUSE], "otters": [OTTERS, LIGHTHOUSE]})


async def _world(
    signer: Signer, server: ModelServer, provider: MemorySearch, *, configured: bool = True
) -> AsyncIterator[World]:
    discovery = MemoryDiscovery()
    card = ModelCard(id="m")
    record = EndpointRecord(url="http://model", models=(card,), registered_at=1)
    await discovery.register(record, 60)
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        snapshot = DiscoverySnapshot(discovery, http, refresh_s=60, eject_s=1)
        await snapshot.refresh()
        rate = MemoryRateLimiter()
        concurrency = MemoryConcurrencyLimiter(rate)
        admission = Admission(rate, concurrency, LimitDefaults(), fail_open=False)
        search = WebSearch(provider, MemoryPageFetcher(pages=dict(PAGES)), quota=admission)
        sink = ListSink()
        service = ChatService(
            HttpxUpstream(http),
            snapshot,
            signer,
            sink,  # type: ignore[arg-type]
            admission,
            metrics=Metrics(),
            drain=Drain(10),
            request_timeout_s=5,
            web_search=search if configured else None,
        )
        yield World(service, server, provider, sink)


@pytest.fixture
async def world(
    signer: Signer, server: ModelServer, provider: MemorySearch
) -> AsyncIterator[World]:
    async for built in _world(signer, server, provider):
        yield built


def _begin(body: dict[str, Any]) -> tuple[ChatCompletionRequest, RequestContext, bytes]:
    raw = json.dumps(body).encode()
    ctx = RequestContext.begin("r", Principal("acct", "api_key"), raw)
    return ChatCompletionRequest.model_validate(body), ctx, raw


EXPECTED_SOURCES = [
    {"source": LIGHTHOUSE.url, "content": PAGES[LIGHTHOUSE.url]},
    {"source": OTTERS.url, "content": OTTERS.snippet},  # its page failed: the snippet
]


async def test_a_completion_carries_signed_sources_and_counts_the_planner(
    world: World, signer: Signer
):
    request, ctx, raw = _begin({"model": "m", "messages": [USER], "web_search": True})
    result = await world.service.complete(request, ctx)
    body = json.loads(result.body)
    assert body["sources"] == EXPECTED_SOURCES
    assert body["usage"] == {"prompt_tokens": 340, "completion_tokens": 17, "total_tokens": 357}
    verify_response(result.body, signer.public_key_b64, request=raw)
    edited = result.body.replace(b"412 ships.", b"413 ships.", 1)
    with pytest.raises(VerificationError):
        verify_response(edited, signer.public_key_b64)

    (planner,) = world.server.planner_calls
    assert (planner["max_tokens"], planner["stream"]) == (256, False)
    (answer,) = world.server.answers
    first = answer["messages"][0]
    assert first["role"] == "system"
    assert "[1] https://a.example/lighthouse\nThe keeper counted 412 ships." in first["content"]
    assert answer["messages"][1:] == [USER]
    assert "web_search" not in answer
    (log,) = world.sink.logs
    assert (log.prompt_tokens, log.completion_tokens) == (340, 17)
    assert (log.web_search, log.searches, log.status_code) == (True, 2, 200)


async def test_a_stream_signs_the_sources_on_its_last_chunk_and_counts_the_planner(
    world: World, signer: Signer
):
    body = {
        "model": "m",
        "messages": [USER],
        "web_search": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request, ctx, raw = _begin(body)
    stream = await world.service.stream(request, ctx)
    out = b"".join([part async for part in stream.events])
    await stream.aclose()
    verify_stream(out, signer.public_key_b64, request=raw)
    payloads = [
        json.loads(line[len(b"data: ") :])
        for line in out.split(b"\n")
        if line.startswith(b"data: {")
    ]
    assert [("sources" in p) for p in payloads] == [False] * (len(payloads) - 1) + [True]
    assert payloads[-1]["sources"] == EXPECTED_SOURCES
    assert payloads[-1]["usage"] == {
        "prompt_tokens": 340,
        "completion_tokens": 17,
        "total_tokens": 357,
    }
    (log,) = world.sink.logs
    assert (log.prompt_tokens, log.completion_tokens, log.searches) == (340, 17, 2)


async def test_a_failed_planner_searches_the_users_message_and_costs_nothing(
    signer: Signer, provider: MemorySearch
):
    server = ModelServer(planner_status=500)
    provider.results[USER["content"]] = [LIGHTHOUSE]
    async for world in _world(signer, server, provider):
        request, ctx, _ = _begin({"model": "m", "messages": [USER], "web_search": True})
        body = json.loads((await world.service.complete(request, ctx)).body)
        assert provider.queries == [USER["content"]]
        assert body["usage"] == ANSWER_USAGE
        assert body["sources"] == [{"source": LIGHTHOUSE.url, "content": PAGES[LIGHTHOUSE.url]}]


async def test_unconfigured_web_search_is_503_before_any_model_call(
    signer: Signer, server: ModelServer, provider: MemorySearch
):
    async for world in _world(signer, server, provider, configured=False):
        request, ctx, _ = _begin({"model": "m", "messages": [USER], "web_search": True})
        with pytest.raises(ContextUnavailable) as refused:
            await world.service.complete(request, ctx)
        assert refused.value.status == 503
        assert refused.value.code == "web_search_not_configured"
        assert "NILAI_WEB_SEARCH_API_KEY" in refused.value.message
        assert server.bodies == []
        (log,) = world.sink.logs
        assert (log.status_code, log.searches) == (503, 0)


async def test_a_request_without_web_search_searches_nothing(world: World):
    request, ctx, _ = _begin({"model": "m", "messages": [USER]})
    body = json.loads((await world.service.complete(request, ctx)).body)
    assert "sources" not in body
    assert body["usage"] == ANSWER_USAGE
    assert world.provider.searches == []
    assert world.server.planner_calls == []


async def test_a_search_that_fails_still_accounts_the_planners_tokens(world: World):
    world.provider.failure = ContextUnavailable("down", code="web_search_unavailable")
    request, ctx, _ = _begin({"model": "m", "messages": [USER], "web_search": True})
    with pytest.raises(ContextUnavailable):
        await world.service.complete(request, ctx)
    assert world.server.answers == []
    (log,) = world.sink.logs
    assert (log.status_code, log.searches) == (503, 0)
    assert (log.prompt_tokens, log.completion_tokens) == (40, 12)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_disconnect_during_the_search_stops_it_and_is_accounted_499(
    signer: Signer, server: ModelServer, stream: bool
):
    searching = asyncio.Event()

    class Hanging(MemorySearch):
        async def search(self, query: str, *, count: int) -> list[SearchResult]:
            searching.set()
            await asyncio.Event().wait()  # a provider that never answers
            return []

    async def receive() -> Message:
        await searching.wait()
        return {"type": "http.disconnect"}

    async for world in _world(signer, server, Hanging()):
        body = {"model": "m", "messages": [USER], "web_search": True, "stream": stream}
        request, ctx, _ = _begin(body)
        call = world.service.stream if stream else world.service.complete
        with pytest.raises(ClientGone):
            await call(request, ctx, receive)
        assert world.server.answers == []
        (log,) = world.sink.logs
        assert (log.status_code, log.error_kind, log.searches) == (499, "ClientDisconnected", 0)
        assert (log.prompt_tokens, log.completion_tokens) == (40, 12)  # the planner's call
