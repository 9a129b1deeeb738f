"""NilragNodes: the node URL policy, the two calls and their bounds, against stand-in nilDB
nodes on loopback (tests.fakes.nilrag) and, where the wire itself is inspected, httpx's mock
transport.

The stand-ins speak plain http on 127.0.0.0/8, so these tests pass ``schemes={"http",
"https"}`` with a policy that allowlists loopback; production uses the defaults (https only, no
allowlist), which are tested to refuse the same stand-ins before sending anything.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from nilai.context.addresses import AddressPolicy
from nilai.context.rag.nodes import (
    HTTPS_ONLY,
    NilragNodes,
    NodeError,
    NodeLimits,
    NodeRefused,
)
from nilai.protocol.nilrag import NilragNode
from tests.fakes.nilrag import DIMENSION, ERROR_MARKER, HUGE_BYTES, Fault
from tests.support.nilrag import DataOwner, StandInNode, down_node, running_nodes
from tests.support.servers import wait_until_async

LOOPBACK = ["127.0.0.0/8"]
TEST_SCHEMES = frozenset({"http", "https"})
QUERY_ID = "7d6c3a52-6f1f-4bfb-9e0a-3f5d6b1d2a10"
SCHEMA_ID = "c1a0f3d4-2b5e-4c6f-8a7b-9d0e1f2a3b4c"


class WordEmbedder:
    """Enough of an embedder for the data owner here (ranking is tested in test_fakes)."""

    def embed(self, text: str) -> list[float]:
        vector = [0.0] * DIMENSION
        for word in text.lower().split():
            vector[sum(word.encode()) % DIMENSION] += 0.1
        return vector


@asynccontextmanager
async def client() -> AsyncGenerator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as http:
        yield http


def make_nodes(
    http: httpx.AsyncClient,
    *,
    policy: AddressPolicy | None = None,
    timeout_s: float = 5.0,
    max_response_bytes: int = 1024 * 1024,
    schemes: frozenset[str] = TEST_SCHEMES,
) -> NilragNodes:
    return NilragNodes(
        http,
        policy or AddressPolicy(allow=LOOPBACK),
        NodeLimits(timeout_s=timeout_s, max_response_bytes=max_response_bytes),
        schemes=schemes,
    )


def as_node(entry: dict[str, str]) -> NilragNode:
    return NilragNode.model_validate(entry)


def seeded(nodes: list[StandInNode], texts: list[str]) -> list[str]:
    owned = DataOwner(WordEmbedder(), len(nodes)).seed([node.state for node in nodes], texts)
    return [document.id for document in owned]


def mock_node(url: str = "https://node.example/api/v1") -> NilragNode:
    # Not validated: the node policy must hold even for URLs the request model would refuse.
    return NilragNode.model_construct(
        url=url, bearer_token="tok-mock-1", schema_id=SCHEMA_ID, diff_query_id=QUERY_ID
    )


class Streamed(httpx.AsyncByteStream):
    """A body that arrives as a stream, as from the network; records whether it was read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.iterated = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.iterated = True
        yield self.data


def streamed(status: int, data: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, stream=Streamed(data))


def answering(
    seen: list[httpx.Request], response: Callable[[httpx.Request], httpx.Response]
) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return response(request)

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


def resolving(answers: dict[str, list[str]], asked: list[str]):
    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in answers:
            raise OSError("name does not resolve")
        return answers[host]

    return resolve


# ---------------------------------------------------------------- round trips


async def test_execute_sends_the_query_share_with_the_token_and_returns_the_raw_answer():
    with running_nodes(2) as stand_ins:
        ids = seeded(stand_ins, ["alpha beta", "gamma delta", "beta gamma"])
        stand_in = stand_ins[0]
        node = as_node(stand_in.node())
        share = list(range(DIMENSION))
        async with client() as http:
            nodes = make_nodes(http)
            [target, _] = await nodes.check([node, as_node(stand_ins[1].node())])
            answer = await nodes.execute(0, node, target, share)
        [recorded] = stand_in.state.requests
        assert recorded.route == "execute"
        assert recorded.authorized
        assert recorded.body == {"id": node.diff_query_id, "variables": {"query_embedding": share}}
        data = json.loads(answer)["data"]
        assert sorted(item["_id"] for item in data) == sorted(ids)
        for item in data:
            stored = stand_in.state.documents[item["_id"]].embedding
            assert item["difference"] == [
                value - asked for value, asked in zip(stored, share, strict=True)
            ]
        assert stand_ins[1].state.requests == []


async def test_read_asks_for_the_ids_in_the_schema_and_returns_the_raw_answer():
    with running_nodes(2) as stand_ins:
        ids = seeded(stand_ins, ["alpha beta", "gamma delta", "beta gamma"])
        stand_in = stand_ins[1]
        node = as_node(stand_in.node())
        async with client() as http:
            nodes = make_nodes(http)
            [target] = await nodes.check([node])
            answer = await nodes.read(1, node, target, ids[:2])
        [recorded] = stand_in.state.requests
        assert (recorded.route, recorded.authorized) == ("read", True)
        assert recorded.body == {"schema": node.schema_id, "filter": {"_id": {"$in": ids[:2]}}}
        data = json.loads(answer)["data"]
        assert {item["_id"]: item["chunk"] for item in data} == {
            document_id: stand_in.state.documents[document_id].chunk for document_id in ids[:2]
        }


async def test_a_name_is_resolved_once_and_both_calls_go_to_the_checked_address():
    with running_nodes(2) as stand_ins:
        seeded(stand_ins, ["alpha beta"])
        stand_in = stand_ins[0]
        port = stand_in.server.port
        # A rebinding name: loopback (allowlisted) when checked, private on any later lookup.
        answers = iter([["127.0.0.1"]])
        asked: list[str] = []

        async def rebinding(host: str, port: int) -> list[str]:
            asked.append(host)
            return next(answers, ["10.0.0.1"])

        entry = {**stand_in.node(), "url": f"http://node-a.invalid:{port}/api/v1"}
        node = as_node(entry)
        async with client() as http:
            nodes = make_nodes(http, policy=AddressPolicy(allow=LOOPBACK, resolver=rebinding))
            [target] = await nodes.check([node])
            await nodes.execute(0, node, target, [0] * DIMENSION)
            await nodes.read(0, node, target, [])
        assert asked == ["node-a.invalid"]
        assert [(r.route, r.host) for r in stand_in.state.requests] == [
            ("execute", f"node-a.invalid:{port}"),
            ("read", f"node-a.invalid:{port}"),
        ]


async def test_https_calls_are_pinned_with_host_sni_and_connection_close_and_no_cookies():
    seen: list[httpx.Request] = []
    asked: list[str] = []
    policy = AddressPolicy(resolver=resolving({"node.example": ["93.184.215.14"]}, asked))
    node = mock_node()
    http = answering(seen, lambda _: streamed(200, b'{"data":[]}'))
    http.cookies.set("session", "another-service-cookie")
    async with http:
        nodes = NilragNodes(http, policy)  # production defaults: https only, no allowlist
        [target] = await nodes.check([node])
        assert await nodes.execute(0, node, target, [1, 2]) == b'{"data":[]}'
    [request] = seen
    assert str(request.url) == "https://93.184.215.14/api/v1/queries/execute"
    assert request.headers["host"] == "node.example"
    assert request.extensions["sni_hostname"] == "node.example"
    assert request.headers["connection"] == "close"
    assert request.headers["authorization"] == "Bearer tok-mock-1"
    assert request.headers["accept-encoding"] == "identity"
    assert request.headers["content-type"] == "application/json"
    assert "cookie" not in request.headers
    assert json.loads(request.content) == {
        "id": QUERY_ID,
        "variables": {"query_embedding": [1, 2]},
    }
    assert target.address == ipaddress.ip_address("93.184.215.14")
    assert asked == ["node.example"]


# ---------------------------------------------------------------- refused before sending


async def test_production_defaults_refuse_http_and_loopback_and_send_nothing():
    with running_nodes(2) as stand_ins:
        node = as_node(stand_ins[0].node())
        async with client() as http:
            production = NilragNodes(http, AddressPolicy())
            assert production.limits == NodeLimits()
            with pytest.raises(NodeRefused) as scheme:
                await production.check([node])
            # http allowed, but loopback not allowlisted: refused after resolution.
            loopback = NilragNodes(http, AddressPolicy(), schemes=TEST_SCHEMES)
            with pytest.raises(NodeRefused) as address:
                await loopback.check([node])
        assert (scheme.value.index, scheme.value.kind, scheme.value.reason) == (
            0,
            "refused",
            "scheme",
        )
        assert (address.value.index, address.value.reason) == (0, "forbidden_address")
        assert stand_ins[0].state.requests == []
    assert frozenset({"https"}) == HTTPS_ONLY


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/api/v1", "forbidden_address"),
        ("https://169.254.169.254/latest", "forbidden_address"),
        ("https://[::ffff:169.254.169.254]/api/v1", "forbidden_address"),
        ("https://10.0.0.1/api/v1", "forbidden_address"),
        ("https://intranet.test/api/v1", "forbidden_address"),
        ("https://nowhere.test/api/v1", "dns"),
        ("ftp://node.example/api/v1", "scheme"),
    ],
)
async def test_refused_urls_raise_node_refused_and_nothing_is_sent(url: str, reason: str):
    seen: list[httpx.Request] = []
    asked: list[str] = []
    # Even with loopback allowlisted and http allowed (the test settings), these stay refused.
    policy = AddressPolicy(
        allow=LOOPBACK, resolver=resolving({"intranet.test": ["10.1.2.3"]}, asked)
    )
    ok = mock_node("https://127.0.0.1:9/api/v1")
    async with answering(seen, lambda _: streamed(200, b'{"data":[]}')) as http:
        nodes = NilragNodes(http, policy, schemes=TEST_SCHEMES)
        with pytest.raises(NodeRefused) as refused:
            await nodes.check([ok, mock_node(url)])
    assert (refused.value.index, refused.value.kind, refused.value.reason) == (1, "refused", reason)
    assert str(refused.value) == f"nilDB node 1: refused ({reason})"
    assert seen == []


async def test_the_lowest_refused_index_is_reported():
    policy = AddressPolicy(resolver=resolving({}, []))
    async with client() as http:
        nodes = NilragNodes(http, policy)
        with pytest.raises(NodeRefused) as refused:
            await nodes.check(
                [
                    mock_node("https://93.184.215.14/api/v1"),
                    mock_node("https://127.0.0.1/api/v1"),
                    mock_node("http://93.184.215.14/api/v1"),
                ]
            )
    assert (refused.value.index, refused.value.reason) == (1, "forbidden_address")


async def test_a_name_that_resolves_too_slowly_times_out_in_check():
    async def stuck(host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        return []

    async with client() as http:
        nodes = NilragNodes(http, AddressPolicy(resolver=stuck), NodeLimits(timeout_s=0.2))
        with pytest.raises(NodeError) as failed:
            await nodes.check([mock_node("https://93.184.215.14/api/v1"), mock_node()])
    assert (failed.value.index, failed.value.kind) == (1, "timeout")


# ---------------------------------------------------------------- failing nodes


async def test_a_redirect_fails_the_node_and_is_not_followed():
    with running_nodes(2) as stand_ins:
        source, target_node = stand_ins
        source.state.redirect_to = f"{target_node.url}/trap"
        source.state.fail(Fault.REDIRECT)
        node = as_node(source.node())
        async with client() as http:
            nodes = make_nodes(http)
            [target] = await nodes.check([node])
            with pytest.raises(NodeError) as failed:
                await nodes.execute(0, node, target, [0] * DIMENSION)
        assert (failed.value.index, failed.value.kind) == (0, "redirect")
        assert failed.value.status_code == 307
        assert source.state.routes() == ["execute"]
        assert target_node.state.requests == []


async def test_a_node_that_hangs_times_out_and_the_connection_is_dropped():
    with running_nodes(2) as stand_ins:
        stand_in = stand_ins[0]
        stand_in.state.fail(Fault.HANG)
        node = as_node(stand_in.node())
        async with client() as http:
            nodes = make_nodes(http, timeout_s=0.3)
            [target] = await nodes.check([node])
            with pytest.raises(NodeError) as failed:
                await nodes.read(0, node, target, ["x"])
        assert (failed.value.index, failed.value.kind) == (0, "timeout")

        async def hung_up() -> bool:
            return stand_in.state.hung_up == 1

        await wait_until_async(hung_up, what="the stand-in to see the client hang up")


async def test_a_huge_answer_is_too_large_and_not_read_to_the_end():
    with running_nodes(2) as stand_ins:
        stand_in = stand_ins[0]
        stand_in.state.fail(Fault.HUGE)
        node = as_node(stand_in.node())
        async with client() as http:
            nodes = make_nodes(http, max_response_bytes=1024 * 1024)
            [target] = await nodes.check([node])
            with pytest.raises(NodeError) as failed:
                await nodes.execute(0, node, target, [0] * DIMENSION)
        assert (failed.value.index, failed.value.kind) == (0, "too_large")
        # The client hung up near the cap: nowhere near the 50 MB went out (socket buffers aside).
        assert stand_in.state.huge_bytes_sent < HUGE_BYTES // 5


async def test_a_declared_length_over_the_cap_is_refused_without_reading_the_body():
    body = Streamed(b"{}")

    def respond(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-length": str(10**9)}, stream=body)

    policy = AddressPolicy(resolver=resolving({"node.example": ["93.184.215.14"]}, []))
    async with answering([], respond) as http:
        nodes = NilragNodes(http, policy, NodeLimits(max_response_bytes=1000))
        [target] = await nodes.check([mock_node()])
        with pytest.raises(NodeError) as failed:
            await nodes.execute(0, mock_node(), target, [0])
    assert failed.value.kind == "too_large"
    assert not body.iterated


async def test_a_body_exactly_at_the_cap_is_accepted_and_one_byte_more_is_not():
    body = b"x" * 1000
    policy = AddressPolicy(resolver=resolving({"node.example": ["93.184.215.14"]}, []))
    async with answering([], lambda _: streamed(200, body)) as http:
        exact = NilragNodes(http, policy, NodeLimits(max_response_bytes=1000))
        [target] = await exact.check([mock_node()])
        assert await exact.execute(0, mock_node(), target, [0]) == body
        short = NilragNodes(http, policy, NodeLimits(max_response_bytes=999))
        with pytest.raises(NodeError) as failed:
            await short.execute(0, mock_node(), target, [0])
    assert failed.value.kind == "too_large"


async def test_a_compressed_answer_is_refused():
    policy = AddressPolicy(resolver=resolving({"node.example": ["93.184.215.14"]}, []))

    def gzipped(_: httpx.Request) -> httpx.Response:
        return streamed(200, b"\x1f\x8b", {"content-encoding": "gzip"})

    async with answering([], gzipped) as http:
        nodes = NilragNodes(http, policy)
        [target] = await nodes.check([mock_node()])
        with pytest.raises(NodeError) as failed:
            await nodes.execute(2, mock_node(), target, [0])
    assert (failed.value.index, failed.value.kind, failed.value.status_code) == (2, "status", 200)


async def test_a_server_error_is_a_status_failure_without_its_body():
    with running_nodes(2) as stand_ins:
        stand_in = stand_ins[1]
        stand_in.state.fail(Fault.ERROR)
        node = as_node(stand_in.node())
        async with client() as http:
            nodes = make_nodes(http)
            [target] = await nodes.check([node])
            with pytest.raises(NodeError) as failed:
                await nodes.execute(1, node, target, [0] * DIMENSION)
        assert (failed.value.index, failed.value.kind, failed.value.status_code) == (
            1,
            "status",
            500,
        )
        assert ERROR_MARKER not in "".join(traceback.format_exception(failed.value))


async def test_a_wrong_token_is_a_status_failure():
    with running_nodes(2) as stand_ins:
        entry = {**stand_ins[0].node(), "bearer_token": "not-the-token"}
        node = as_node(entry)
        async with client() as http:
            nodes = make_nodes(http)
            [target] = await nodes.check([node])
            with pytest.raises(NodeError) as failed:
                await nodes.execute(0, node, target, [0] * DIMENSION)
        assert (failed.value.kind, failed.value.status_code) == ("status", 401)
        assert [r.authorized for r in stand_ins[0].state.requests] == [False]


async def test_a_node_that_is_down_is_unreachable():
    node = as_node(down_node())
    async with client() as http:
        nodes = make_nodes(http)
        [target] = await nodes.check([node])
        with pytest.raises(NodeError) as failed:
            await nodes.execute(3, node, target, [0] * DIMENSION)
    assert (failed.value.index, failed.value.kind) == (3, "unreachable")
    assert str(failed.value) == "nilDB node 3: unreachable"


async def test_the_token_is_never_in_errors_or_logs(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    with running_nodes(2) as stand_ins:
        hanging, failing = stand_ins
        hanging.state.fail(Fault.HANG)
        failing.state.fail(Fault.ERROR, ["execute"])
        failing.state.fail(Fault.HUGE, ["read"])
        down = down_node(failing)
        tokens = [hanging.state.token, failing.state.token]
        async with client() as http:
            nodes = make_nodes(http, timeout_s=0.3, max_response_bytes=64 * 1024)
            entries = [hanging.node(), failing.node(), down]
            checked = await nodes.check([as_node(entry) for entry in entries])
            calls: list[Any] = [
                nodes.execute(0, as_node(entries[0]), checked[0], [0] * DIMENSION),
                nodes.execute(1, as_node(entries[1]), checked[1], [0] * DIMENSION),
                nodes.read(1, as_node(entries[1]), checked[1], ["x"]),
                nodes.read(2, as_node(entries[2]), checked[2], ["x"]),
            ]
            for call in calls:
                with pytest.raises(NodeError) as failed:
                    await call
                errors.append(failed.value)
            refused = {**failing.node(), "url": "http://169.254.169.254/api/v1"}
            with pytest.raises(NodeRefused) as refusal:
                await nodes.check([as_node(refused)])
            errors.append(refusal.value)
    assert [getattr(error, "kind", None) for error in errors] == [
        "timeout",
        "status",
        "too_large",
        "unreachable",
        "refused",
    ]
    logged = caplog.text + "".join(str(record.args) for record in caplog.records)
    for error in errors:
        shown = "".join(traceback.format_exception(error)) + repr(error) + repr(vars(error))
        for token in tokens:
            assert token not in shown
            assert token not in logged
