"""NilRAG through the real gateway (issue 21), against stand-in nilDB nodes on loopback.

A data owner (tests.support.nilrag) shares a 20-chunk corpus to three stand-in nodes with the
gateway's own embedding model (all-MiniLM-L6-v2); clients ask through the openai SDK with
``extra_body={"nilrag": ...}``. The fake model server must then see exactly the chunks a
plaintext MiniLM search ranks first, in that order, wherever the system message puts them. The
failures (refused URLs before anything is sent, nodes that redirect, hang, flood or are down,
one node only, a gateway without NilRAG) and the privacy of the question, the chunks and the
node tokens (logs, database) are checked here too.

One gateway (MiniLM loads in its lifespan: seconds) serves most of the module; a second one
without ``nilrag_allow_networks`` checks the production URL rules.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy import select

from nilai.context.rag.embed import MiniLMEmbedder
from nilai.context.rag.retriever import context_message
from nilai.gateway.app import create_app
from nilai.settings import NilaiSettings
from nilai.store.sql import SqlStore
from nilai.store.tables import QueryLogRow
from tests.conftest import TEST_API_KEY, FakeHandle, GatewayHandle
from tests.fakes.fake_openai_server import FakeConfig, create_fake_app
from tests.fakes.nilrag import ERROR_MARKER, Fault
from tests.support.nilrag import (
    DataOwner,
    StandInNode,
    down_node,
    plaintext_distances,
    running_nodes,
)
from tests.support.servers import ServerThread, wait_until
from tests.support.stores import database, dump_database, with_store

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ALLOW = ["127.0.0.1/32"]
NODE_TIMEOUT_S = 1.0
K = 3

CORPUS = [
    "Saturn is the planet with the largest and brightest system of rings.",
    "Jupiter is the biggest planet in the solar system and has a great red storm.",
    "Mars looks red because its surface is covered in iron oxide dust.",
    "The Moon takes about twenty-seven days to orbit the Earth.",
    "Neptune was found in 1846 from predictions based on the orbit of Uranus.",
    "A sourdough starter is a mixture of flour and water full of wild yeast.",
    "Risotto is made by slowly adding hot stock to arborio rice while stirring.",
    "Fresh pasta needs only eggs and flour, kneaded into a smooth dough.",
    "Caramel forms when sugar is heated until it melts and turns brown.",
    "Guacamole is a dip of mashed avocado, lime juice, onion and salt.",
    "The Nile flows north through eleven countries into the Mediterranean Sea.",
    "The Amazon carries more water than any other river on Earth.",
    "The Danube passes through four capital cities on its way to the Black Sea.",
    "The Mississippi river drains most of the central United States.",
    "The Thames flows through London and reaches the North Sea.",
    "Python is a programming language known for its readable syntax.",
    "A hash table finds values by key in constant time on average.",
    "Git records the history of a project as a graph of commits.",
    "TCP retransmits packets that were lost on the way to the receiver.",
    "A compiler translates source code into machine instructions.",
]
QUESTION = f"Which planet has the famous rings? (ref {uuid.uuid4().hex[:12]})"
"""The question; its random reference makes it findable in logs and in the database."""
CLIENT_SYSTEM = "You answer in one short sentence."


# ---------------------------------------------------------------- the module's world


@dataclass
class World:
    """The module's fake model server, stand-in nodes, database and NilRAG gateway."""

    fake: FakeHandle
    nodes: list[StandInNode]
    gateway: GatewayHandle
    db_url: str
    top: list[str]
    """The plaintext MiniLM ranking's first ``K`` chunks for ``QUESTION``."""

    def entries(self) -> list[dict[str, str]]:
        """The nodes as the request's ``nilrag.nodes``."""
        return [node.node() for node in self.nodes]

    def tokens(self) -> list[str]:
        """The nodes' bearer tokens (the client's secrets)."""
        return [node.state.token for node in self.nodes]


def ranked_top(embedder: MiniLMEmbedder) -> list[str]:
    """The first ``K`` chunks for ``QUESTION`` in the clear, checked to be well separated."""
    scored = plaintext_distances(QUESTION, CORPUS, embedder)
    for (_, closer), (_, further) in itertools.pairwise(scored[: K + 1]):
        # Far more than the 1e-7 fixed point of the shares: their order cannot flip.
        assert further - closer > 1e-4, scored[: K + 1]
    return [text for text, _ in scored[:K]]


def gateway_settings(data_dir: Path, fake: FakeHandle, **overrides: Any) -> NilaiSettings:
    """A NilRAG gateway's settings in front of ``fake`` (as ``start_gateway`` sets the rest)."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "api_keys": [TEST_API_KEY],
        "upstream_urls": [fake.url],
        "discovery_refresh_s": 0.2,
        "discovery_ttl_s": 3.0,
        "endpoint_eject_s": 2.0,
        "rate_limit_minute": 0,
        "rate_limit_hour": 0,
        "rate_limit_day": 0,
        "nilrag_enabled": True,
        **overrides,
    }
    return NilaiSettings(**values)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Three seeded stand-ins, a fake model server and a NilRAG gateway on PostgreSQL."""
    app = create_fake_app(FakeConfig())
    fake = FakeHandle(ServerThread(app).start(), app.state.fake)
    directory = tmp_path_factory.mktemp("nilrag")
    try:
        with running_nodes(3, seed=21) as nodes, database("postgresql", directory) as db_url:
            embedder = MiniLMEmbedder()
            DataOwner(embedder, 3).seed([node.state for node in nodes], CORPUS)
            settings = gateway_settings(
                directory / "gateway",
                fake,
                nilrag_allow_networks=ALLOW,
                nilrag_node_timeout_s=NODE_TIMEOUT_S,
                database_url=db_url,
                usage_flush_interval_s=0.1,
            )
            gateway = GatewayHandle(ServerThread(create_app(settings)).start(), settings)
            try:
                yield World(fake, nodes, gateway, db_url, ranked_top(embedder))
            finally:
                gateway.thread.stop()
    finally:
        fake.stop()


@pytest.fixture
def nilrag_nodes(world: World) -> Iterator[World]:
    """``world`` with healthy stand-ins and nothing recorded, and so left after the test."""

    def reset() -> None:
        for node in world.nodes:
            node.state.fail(None)
            node.state.requests.clear()

    reset()
    yield world
    reset()


# ---------------------------------------------------------------- helpers


def ask(
    world: World,
    messages: list[dict[str, Any]],
    *,
    nodes: list[dict[str, str]] | None = None,
    num_chunks: int = K,
    stream: bool = False,
) -> str:
    """Send a NilRAG chat through the SDK; the ``x-request-id`` the gateway answered with."""
    nilrag = {"nodes": world.entries() if nodes is None else nodes, "num_chunks": num_chunks}
    sent = cast("list[ChatCompletionMessageParam]", messages)
    with world.gateway.client() as client:
        chats = client.chat.completions.with_raw_response
        if stream:
            streamed = chats.create(
                model="fake-model", messages=sent, stream=True, extra_body={"nilrag": nilrag}
            )
            text = "".join(
                choice.delta.content or "" for chunk in streamed.parse() for choice in chunk.choices
            )
            headers = streamed.headers
        else:
            whole = chats.create(model="fake-model", messages=sent, extra_body={"nilrag": nilrag})
            text = whole.parse().choices[0].message.content or ""
            headers = whole.headers
    assert text.startswith("fake says:"), text
    return headers["x-request-id"]


def refused(
    world: World | GatewayHandle,
    nodes: list[dict[str, str]],
    error: type[openai.APIStatusError] = openai.APIStatusError,
) -> openai.APIStatusError:
    """The error the gateway answers a NilRAG chat over ``nodes`` with (it must fail)."""
    gateway = world.gateway if isinstance(world, World) else world
    with gateway.client() as client, pytest.raises(error) as raised:
        client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"nilrag": {"nodes": nodes, "num_chunks": K}},
        )
    return raised.value


def upstream_messages(world: World) -> list[dict[str, Any]]:
    """The messages of the last chat the fake model server received."""
    body = world.fake.state.stats.last_body
    assert body is not None
    return body["messages"]


def query_log(world: World, request_id: str) -> QueryLogRow:
    """The query log row of ``request_id``, once written."""

    async def read(store: SqlStore) -> QueryLogRow | None:
        async with store.session() as session:
            query = select(QueryLogRow).where(QueryLogRow.request_id == request_id)
            return (await session.execute(query)).scalars().first()

    return wait_until(lambda: with_store(world.db_url, read), what=f"the log of {request_id}")


def assert_nothing_sent(world: World, fake_requests: int) -> None:
    """No stand-in and no model server got a request since ``fake_requests`` were counted."""
    assert [node.state.routes() for node in world.nodes] == [[], [], []]
    assert world.fake.state.stats.requests == fake_requests


# ---------------------------------------------------------------- the chunks in the prompt


def test_the_prompt_gets_the_plaintext_top_chunks_in_order(nilrag_nodes: World):
    world = nilrag_nodes
    request_id = ask(world, [{"role": "user", "content": QUESTION}])
    assert upstream_messages(world) == [
        {"role": "system", "content": context_message(world.top)},
        {"role": "user", "content": QUESTION},
    ]
    for node in world.nodes:
        assert node.state.routes() == ["execute", "read"]
        assert all(recorded.authorized for recorded in node.state.requests)
    row = query_log(world, request_id)
    assert (row.nilrag, row.nilrag_chunks, row.streamed, row.status_code) == (True, K, False, 200)


def test_a_client_system_string_gets_the_chunks_after_a_blank_line(nilrag_nodes: World):
    world = nilrag_nodes
    ask(
        world,
        [{"role": "system", "content": CLIENT_SYSTEM}, {"role": "user", "content": QUESTION}],
    )
    assert upstream_messages(world) == [
        {"role": "system", "content": f"{CLIENT_SYSTEM}\n\n{context_message(world.top)}"},
        {"role": "user", "content": QUESTION},
    ]


def test_client_system_parts_get_one_more_text_part(nilrag_nodes: World):
    world = nilrag_nodes
    parts = [{"type": "text", "text": CLIENT_SYSTEM}]
    ask(world, [{"role": "system", "content": parts}, {"role": "user", "content": QUESTION}])
    messages = upstream_messages(world)
    assert [message["role"] for message in messages] == ["system", "user"]
    assert messages[0]["content"] == [
        {"type": "text", "text": CLIENT_SYSTEM},
        {"type": "text", "text": context_message(world.top)},
    ]


def test_a_question_in_content_parts_is_found(nilrag_nodes: World):
    world = nilrag_nodes
    question = [{"type": "text", "text": QUESTION}]
    ask(world, [{"role": "user", "content": question}])
    messages = upstream_messages(world)
    assert messages[0] == {"role": "system", "content": context_message(world.top)}
    assert [message["role"] for message in messages] == ["system", "user"]


def test_a_streamed_chat_gets_the_same_chunks_and_is_logged(nilrag_nodes: World):
    world = nilrag_nodes
    request_id = ask(
        world,
        [{"role": "system", "content": CLIENT_SYSTEM}, {"role": "user", "content": QUESTION}],
        stream=True,
    )
    assert upstream_messages(world)[0] == {
        "role": "system",
        "content": f"{CLIENT_SYSTEM}\n\n{context_message(world.top)}",
    }
    assert world.fake.state.stats.last_body is not None
    assert world.fake.state.stats.last_body.get("stream") is True
    row = query_log(world, request_id)
    assert (row.nilrag, row.nilrag_chunks, row.streamed, row.status_code) == (True, K, True, 200)


# ---------------------------------------------------------------- refused before anything is sent


def test_a_node_at_the_metadata_address_is_refused_and_nothing_is_sent(nilrag_nodes: World):
    world = nilrag_nodes
    before = world.fake.state.stats.requests
    nodes = world.entries()
    nodes[2] = {**nodes[2], "url": "http://169.254.169.254/api/v1"}
    error = refused(world, nodes, openai.UnprocessableEntityError)
    assert (error.status_code, error.code, error.param) == (
        422,
        "invalid_value",
        "nilrag.nodes.2.url",
    )
    assert_nothing_sent(world, before)


def test_a_node_on_another_loopback_address_is_refused_and_nothing_is_sent(
    nilrag_nodes: World,
):
    # 127.0.0.2 is loopback but outside the allowlisted 127.0.0.1/32; a live stand-in there.
    world = nilrag_nodes
    before = world.fake.state.stats.requests
    with running_nodes(1, host="127.0.0.2") as [outside]:
        nodes = world.entries()
        nodes[1] = outside.node()
        error = refused(world, nodes, openai.UnprocessableEntityError)
        assert outside.state.requests == []
    assert (error.status_code, error.code, error.param) == (
        422,
        "invalid_value",
        "nilrag.nodes.1.url",
    )
    assert_nothing_sent(world, before)


def test_without_an_allowlist_http_and_loopback_nodes_are_refused(
    nilrag_nodes: World, tmp_path: Path
):
    world = nilrag_nodes
    settings = gateway_settings(tmp_path / "strict", world.fake)  # no nilrag_allow_networks
    strict = GatewayHandle(ServerThread(create_app(settings)).start(), settings)
    try:
        before = world.fake.state.stats.requests
        # Plain http (the stand-ins' own URLs): refused for its scheme.
        http = refused(strict, world.entries(), openai.UnprocessableEntityError)
        # https, but to loopback: refused for its address.
        nodes = [
            {**entry, "url": entry["url"].replace("http://", "https://")}
            for entry in world.entries()
        ]
        loopback = refused(strict, nodes, openai.UnprocessableEntityError)
    finally:
        strict.thread.stop()
    for error in (http, loopback):
        assert (error.status_code, error.code, error.param) == (
            422,
            "invalid_value",
            "nilrag.nodes.0.url",
        )
    assert "https" in http.message
    assert "not public" in loopback.message
    assert_nothing_sent(world, before)


# ---------------------------------------------------------------- nodes that misbehave


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault.REDIRECT, 502, "nilrag_bad_answer"),
        (Fault.HANG, 504, "nilrag_timeout"),
        (Fault.HUGE, 502, "nilrag_bad_answer"),
        (Fault.ERROR, 502, "nilrag_bad_answer"),
    ],
)
def test_a_misbehaving_node_fails_the_chat_naming_it(
    nilrag_nodes: World, fault: Fault, status: int, code: str
):
    world = nilrag_nodes
    before = world.fake.state.stats.requests
    world.nodes[1].state.fail(fault, routes=["execute"])
    error = refused(world, world.entries(), openai.InternalServerError)
    assert (error.status_code, error.code) == (status, code)
    assert "NilRAG node 1 " in error.message
    assert ERROR_MARKER not in str(error.body)
    assert world.fake.state.stats.requests == before
    if fault is Fault.REDIRECT:
        assert "trap" not in world.nodes[1].state.routes()  # never followed
    if fault is Fault.HUGE:
        # Abandoned at the cap: the rest of the 50 MB was never downloaded.
        huge = world.nodes[1].state
        assert huge.huge_bytes_sent < huge.huge_bytes


def test_a_node_that_is_down_is_named_in_a_503(nilrag_nodes: World):
    world = nilrag_nodes
    before = world.fake.state.stats.requests
    nodes = world.entries()
    nodes[1] = down_node(world.nodes[1])
    error = refused(world, nodes, openai.InternalServerError)
    assert (error.status_code, error.code) == (503, "nilrag_node_unavailable")
    assert "node 1" in error.message
    assert world.fake.state.stats.requests == before


def test_a_single_node_is_refused(nilrag_nodes: World):
    world = nilrag_nodes
    before = world.fake.state.stats.requests
    error = refused(world, world.entries()[:1], openai.UnprocessableEntityError)
    assert (error.status_code, error.param) == (422, "nilrag.nodes")
    assert_nothing_sent(world, before)


def test_a_gateway_without_nilrag_says_so(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url])
    nodes = [
        {
            "url": f"https://node-{index}.example/api/v1",
            "bearer_token": f"token-{index}",
            "schema_id": str(uuid.uuid4()),
            "diff_query_id": str(uuid.uuid4()),
        }
        for index in range(3)
    ]
    error = refused(gateway, nodes, openai.InternalServerError)
    assert (error.status_code, error.code) == (503, "nilrag_not_configured")
    assert "NILAI_NILRAG_ENABLED" in error.message
    assert fake.state.stats.requests == 0


# ---------------------------------------------------------------- privacy


def test_the_question_chunks_and_tokens_are_in_no_log_or_row(
    nilrag_nodes: World,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
):
    world = nilrag_nodes
    caplog.set_level(logging.DEBUG)  # the root logger: every library, every thread
    ids = [
        ask(world, [{"role": "user", "content": QUESTION}]),
        ask(world, [{"role": "user", "content": QUESTION}], stream=True),
    ]
    # Failures too: a refused node, a node that errs, one that is down.
    nodes = world.entries()
    nodes[0] = {**nodes[0], "url": "http://169.254.169.254/api/v1"}
    refused(world, nodes)
    world.nodes[2].state.fail(Fault.ERROR)
    refused(world, world.entries())
    world.nodes[2].state.fail(None)
    nodes = world.entries()
    nodes[1] = down_node(world.nodes[1])
    refused(world, nodes)
    for request_id in ids:
        query_log(world, request_id)

    captured = capfd.readouterr()
    log_text = "\n".join(
        [caplog.text, *(r.getMessage() for r in caplog.records), captured.out, captured.err]
    )
    db_text = repr(dump_database(world.db_url))
    assert caplog.records, "nothing to search: no log records were captured"
    assert any("chat model=" in r.getMessage() for r in caplog.records)  # the gateway's own
    secrets = {"the question": QUESTION, **{f"token {i}": t for i, t in enumerate(world.tokens())}}
    secrets.update({f"chunk {CORPUS.index(chunk)}": chunk for chunk in CORPUS})
    for what, secret in secrets.items():
        assert secret not in log_text, f"{what} appears in the logs"
        assert secret not in db_text, f"{what} appears in the database"
