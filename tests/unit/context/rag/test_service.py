"""NilRag (the retriever): plaintext order, chunk count and every failure's error, end to end
over real ``NilragNodes`` and stand-in nilDB nodes on loopback (tests.fakes.nilrag).

The data owner (tests.support.nilrag) shares the corpus with ``HashEmbedder``, and so does the
retriever: the chunks must come back in the order a plaintext search ranks them. The stand-ins
speak plain http on 127.0.0.1, so the nodes here use ``schemes={"http", "https"}`` with a
policy that allowlists 127.0.0.1/32; the refusals use the production rules instead.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from nilai.context.addresses import AddressPolicy
from nilai.context.rag.embed import Embedder, HashEmbedder
from nilai.context.rag.nodes import HTTPS_ONLY, NilragNodes, NodeLimits
from nilai.context.rag.service import NilRag, decoder_pool
from nilai.errors import (
    NilaiError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
    ValidationFailed,
)
from nilai.protocol.nilrag import NilragRequest
from tests.fakes.nilrag import ERROR_MARKER, Fault
from tests.support.nilrag import (
    DataOwner,
    StandInNode,
    down_node,
    plaintext_distances,
    running_nodes,
)

ALLOW = ["127.0.0.1/32"]
TEST_SCHEMES = frozenset({"http", "https"})
NODES = 3

CORPUS = [
    "The lighthouse keeper counted ships in the winter storm.",
    "Otters returned to the estuary after the river was cleaned.",
    "A recipe for sourdough bread needs flour, water, salt and time.",
    "The orchestra tuned their violins before the concert began.",
    "Glaciers in the northern valley retreat a few metres each summer.",
    "Storm warnings closed the harbour and the lighthouse path.",
    "The museum displays a ledger of ships from the great storm.",
    "Bees pollinate the apple orchard in early spring.",
    "The lighthouse keeper painted the tower white every summer.",
    "The bakery sells rye bread and cinnamon rolls on Sundays.",
    "Ships in the harbour waited for the storm to pass.",
    "The keeper of the museum counted the visitors in winter.",
]
QUESTION = "How many ships did the lighthouse keeper count in the winter storm?"


def ranked(question: str = QUESTION) -> list[str]:
    """The corpus as a plaintext HashEmbedder search ranks it for ``question``."""
    return [text for text, _ in plaintext_distances(question, CORPUS, HashEmbedder())]


def distinct_top(count: int, question: str = QUESTION) -> list[str]:
    """The first ``count`` of the plaintext ranking, checked to be separated from each other
    and from the next (so fixed-point rounding cannot reorder them)."""
    scored = plaintext_distances(question, CORPUS, HashEmbedder())
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(scored[: count + 1])]
    assert min(gaps) > 1e-4, f"the corpus ties at the top: {scored[: count + 1]}"
    return [text for text, _ in scored[:count]]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def seeded_nodes() -> Iterator[list[StandInNode]]:
    """Three stand-in nodes on 127.0.0.1 holding the shared corpus, for the module."""
    with running_nodes(NODES, seed=21) as nodes:
        DataOwner(HashEmbedder(), NODES).seed([node.state for node in nodes], CORPUS)
        yield nodes


@pytest.fixture
def nilrag_nodes(seeded_nodes: list[StandInNode]) -> Iterator[list[StandInNode]]:
    """``seeded_nodes`` with no faults and nothing recorded, and so left after the test."""

    def reset() -> None:
        for node in seeded_nodes:
            node.state.fail(None)
            node.state.requests.clear()

    reset()
    yield seeded_nodes
    reset()


def request_for(entries: Sequence[dict[str, str]], num_chunks: int = 2) -> NilragRequest:
    """The ``nilrag`` field of a request naming ``entries``."""
    return NilragRequest.model_validate({"nodes": list(entries), "num_chunks": num_chunks})


def entries(nodes: Sequence[StandInNode]) -> list[dict[str, str]]:
    """Each stand-in as an entry of ``nilrag.nodes``."""
    return [node.node() for node in nodes]


@asynccontextmanager
async def retriever(
    *,
    embedder: Embedder | None = None,
    allow: Sequence[str] = ALLOW,
    schemes: frozenset[str] = TEST_SCHEMES,
    timeout_s: float = 5.0,
    deadline_s: float = 20.0,
    max_response_bytes: int = 1024 * 1024,
    decoders: Executor | None = None,
) -> AsyncGenerator[NilRag]:
    """A NilRag over real NilragNodes and a fresh httpx client, closed afterwards."""
    async with httpx.AsyncClient(trust_env=False) as http:
        nodes = NilragNodes(
            http,
            AddressPolicy(allow=allow),
            NodeLimits(timeout_s=timeout_s, max_response_bytes=max_response_bytes),
            schemes=schemes,
        )
        rag = NilRag(
            embedder or HashEmbedder(),
            nodes,
            deadline_s=deadline_s,
            max_documents=10_000,
            workers=2,
            # Threads here, for speed; test_decoding_runs_in_worker_processes covers processes.
            decoders=decoders or ThreadPoolExecutor(2, thread_name_prefix="nilai-nilrag-decode"),
        )
        try:
            yield rag
        finally:
            await rag.aclose()


async def failure(request: NilragRequest, **options: Any) -> NilaiError:
    """The error retrieving ``QUESTION`` over ``request`` raises (it must raise one)."""
    async with retriever(**options) as rag:
        with pytest.raises(NilaiError) as raised:
            await rag.retrieve(request, QUESTION)
    return raised.value


def no_requests(nodes: Sequence[StandInNode]) -> list[list[str]]:
    """The routes each stand-in saw (all empty when nothing was sent)."""
    return [node.state.routes() for node in nodes]


# ---------------------------------------------------------------- retrieval


async def test_the_chunks_come_back_in_plaintext_order(nilrag_nodes: list[StandInNode]):
    expected = distinct_top(3)
    async with retriever() as rag:
        retrieved = await rag.retrieve(request_for(entries(nilrag_nodes), 3), QUESTION)
    assert retrieved.chunks == expected
    # Each node got one query share and one read of the three chosen documents.
    for node in nilrag_nodes:
        assert node.state.routes() == ["execute", "read"]
        assert all(recorded.authorized for recorded in node.state.requests)
        read = node.state.requests[1].body
        assert len(read["filter"]["_id"]["$in"]) == 3


@pytest.mark.parametrize("num_chunks", [1, 2, 5, 10])
async def test_num_chunks_is_respected(nilrag_nodes: list[StandInNode], num_chunks: int):
    async with retriever() as rag:
        retrieved = await rag.retrieve(request_for(entries(nilrag_nodes), num_chunks), QUESTION)
    assert len(retrieved.chunks) == num_chunks
    # Only the top few are separated from their neighbours; beyond that the hashed vectors tie.
    top = min(num_chunks, 3)
    assert retrieved.chunks[:top] == distinct_top(top)
    assert set(retrieved.chunks) <= set(CORPUS)
    assert len(set(retrieved.chunks)) == num_chunks


async def test_another_question_gets_another_ranking(nilrag_nodes: list[StandInNode]):
    question = "Where can I buy rye bread and sourdough?"
    expected = distinct_top(2, question)
    assert expected != distinct_top(2)
    async with retriever() as rag:
        retrieved = await rag.retrieve(request_for(entries(nilrag_nodes), 2), question)
    assert retrieved.chunks == expected


async def test_the_work_runs_in_the_retrievers_pools(nilrag_nodes: list[StandInNode]):
    threads: dict[str, list[str]] = {"embed": [], "decode": []}

    class Recording:
        """HashEmbedder, noting the thread each embedding is computed on."""

        dimension = HashEmbedder().dimension

        def embed(self, text: str) -> npt.NDArray[np.float64]:
            threads["embed"].append(threading.current_thread().name)
            return HashEmbedder().embed(text)

    class RecordingDecoders(ThreadPoolExecutor):
        """Decoder threads noting each piece of work they run."""

        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            def run() -> Any:
                threads["decode"].append(threading.current_thread().name)
                return fn(*args, **kwargs)

            return super().submit(run)

    decoders = RecordingDecoders(2, thread_name_prefix="nilai-nilrag-decode")
    async with retriever(embedder=Recording(), decoders=decoders) as rag:
        retrieved = await rag.retrieve(request_for(entries(nilrag_nodes), 3), QUESTION)
    assert retrieved.chunks == distinct_top(3)
    assert len(threads["embed"]) == 1
    assert len(threads["decode"]) == 2  # the ranking, then the chunks
    loop_thread = threading.current_thread().name
    for what, names in threads.items():
        for name in names:
            assert name.startswith("nilai-nilrag"), f"{what} ran on {name}"
            assert name != loop_thread


async def test_decoding_runs_in_worker_processes(nilrag_nodes: list[StandInNode]):
    # The production default: the nodes' answers are decoded in spawned processes.
    decoders = decoder_pool(1)
    assert isinstance(decoders, ProcessPoolExecutor)
    async with retriever(decoders=decoders) as rag:
        rag.warm_up()
        retrieved = await rag.retrieve(request_for(entries(nilrag_nodes), 3), QUESTION)
        malformed = [entry | {} for entry in entries(nilrag_nodes)]
        nilrag_nodes[2].state.fail(Fault.MALFORMED, routes=("execute",))
        with pytest.raises(UpstreamProtocolError) as raised:
            await rag.retrieve(request_for(malformed, 3), QUESTION)
    assert retrieved.chunks == distinct_top(3)
    # The node's index survives the trip back from the worker process.
    assert "NilRAG node 2" in raised.value.message


# ---------------------------------------------------------------- failures of a node


async def test_a_node_that_is_down_is_unavailable_and_named(nilrag_nodes: list[StandInNode]):
    nodes = entries(nilrag_nodes)
    nodes[1] = down_node(nilrag_nodes[1])
    error = await failure(request_for(nodes))
    assert isinstance(error, UpstreamUnavailable)
    assert (error.status, error.code) == (503, "nilrag_node_unavailable")
    assert "node 1" in error.message
    assert "node 0" not in error.message
    assert "node 2" not in error.message


async def test_a_node_that_hangs_times_out_within_the_per_node_timeout(
    nilrag_nodes: list[StandInNode],
):
    nilrag_nodes[2].state.fail(Fault.HANG, routes=["execute"])
    error = await failure(request_for(entries(nilrag_nodes)), timeout_s=0.5, deadline_s=30.0)
    assert isinstance(error, UpstreamTimeout)
    assert (error.status, error.code) == (504, "nilrag_timeout")
    # The node's own timeout, not the overall deadline (whose message names no node).
    assert error.message == "NilRAG node 2 did not answer in time."
    assert nilrag_nodes[2].state.routes() == ["execute"]


@pytest.mark.parametrize(
    ("fault", "routes", "detail"),
    [
        (Fault.REDIRECT, ["execute"], "a redirect (not followed)"),
        (Fault.REDIRECT, ["read"], "a redirect (not followed)"),
        (Fault.HUGE, ["execute"], "an answer over the size limit"),
        (Fault.ERROR, ["execute"], "HTTP 500"),
        (Fault.ERROR, ["read"], "HTTP 500"),
    ],
)
async def test_a_node_answering_badly_is_a_protocol_error_naming_it(
    nilrag_nodes: list[StandInNode], fault: Fault, routes: list[str], detail: str
):
    nilrag_nodes[1].state.fail(fault, routes=routes)
    error = await failure(request_for(entries(nilrag_nodes)))
    assert isinstance(error, UpstreamProtocolError)
    assert (error.status, error.code) == (502, "nilrag_bad_answer")
    assert error.message == f"NilRAG node 1 sent {detail}."
    assert ERROR_MARKER not in error.message
    if fault is Fault.REDIRECT:
        assert "trap" not in nilrag_nodes[1].state.routes()  # never followed


@pytest.mark.parametrize("routes", [["execute"], ["read"]])
async def test_a_malformed_answer_is_a_protocol_error_naming_the_node(
    nilrag_nodes: list[StandInNode], routes: list[str]
):
    nilrag_nodes[2].state.fail(Fault.MALFORMED, routes=routes)
    error = await failure(request_for(entries(nilrag_nodes)))
    assert isinstance(error, UpstreamProtocolError)
    assert (error.status, error.code) == (502, "nilrag_bad_answer")
    assert "NilRAG node 2 " in error.message


async def test_a_document_missing_from_the_differences_is_a_protocol_error(
    nilrag_nodes: list[StandInNode],
):
    nilrag_nodes[1].state.fail(Fault.MISSING, routes=["execute"])
    error = await failure(request_for(entries(nilrag_nodes)))
    assert isinstance(error, UpstreamProtocolError)
    assert (error.status, error.code) == (502, "nilrag_bad_answer")


async def test_a_chunk_missing_from_a_read_is_a_protocol_error_naming_the_node(
    nilrag_nodes: list[StandInNode],
):
    # Node 1 alone leaves out a chunk it was asked for: it, and only it, is at fault.
    nilrag_nodes[1].state.fail(Fault.MISSING, routes=["read"])
    error = await failure(request_for(entries(nilrag_nodes)))
    assert isinstance(error, UpstreamProtocolError)
    assert (error.status, error.code) == (502, "nilrag_bad_answer")
    assert "node 1" in error.message, error.message


async def test_with_two_failing_nodes_the_lowest_index_is_reported(
    nilrag_nodes: list[StandInNode],
):
    nodes = entries(nilrag_nodes)
    nodes[1] = down_node(nilrag_nodes[1])
    nodes[2] = down_node(nilrag_nodes[2])
    error = await failure(request_for(nodes))
    assert isinstance(error, UpstreamUnavailable)
    assert "node 1" in error.message


async def test_with_two_refused_nodes_the_lowest_index_is_reported(
    nilrag_nodes: list[StandInNode],
):
    nodes = entries(nilrag_nodes)
    nodes[2] = {**nodes[2], "url": "http://169.254.169.254/api/v1"}
    nodes[1] = {**nodes[1], "url": "http://10.0.0.1/api/v1"}
    error = await failure(request_for(nodes))
    assert isinstance(error, ValidationFailed)
    assert error.param == "nilrag.nodes.1.url"
    assert no_requests(nilrag_nodes) == [[], [], []]


async def test_the_overall_deadline_is_a_timeout(nilrag_nodes: list[StandInNode]):
    nilrag_nodes[0].state.fail(Fault.HANG, routes=["read"])
    error = await failure(request_for(entries(nilrag_nodes)), timeout_s=30.0, deadline_s=0.5)
    assert isinstance(error, UpstreamTimeout)
    assert (error.status, error.code) == (504, "nilrag_timeout")
    assert error.message == "The NilRAG nodes did not answer within 0.5s."


# ---------------------------------------------------------------- refused before sending


@pytest.mark.parametrize(
    ("index", "url", "options", "reason"),
    [
        # http on a gateway that allowlists nothing (production: https only).
        (0, None, {"allow": [], "schemes": HTTPS_ONLY}, "must be https"),
        # Loopback without an allowlist, even with http allowed (every node: the first named).
        (0, None, {"allow": []}, "resolves to an address that is not public"),
        # The metadata service, even with loopback allowlisted.
        (1, "http://169.254.169.254/api/v1", {}, "resolves to an address that is not public"),
        (1, "https://169.254.169.254/latest", {}, "resolves to an address that is not public"),
        # Another loopback address than the allowlisted one.
        (2, "http://127.0.0.2:9/api/v1", {}, "resolves to an address that is not public"),
    ],
)
async def test_a_refused_url_is_a_validation_error_and_nothing_is_sent(
    nilrag_nodes: list[StandInNode],
    index: int,
    url: str | None,
    options: dict[str, Any],
    reason: str,
):
    nodes = entries(nilrag_nodes)
    if url is not None:
        nodes[index] = {**nodes[index], "url": url}
    error = await failure(request_for(nodes), **options)
    assert isinstance(error, ValidationFailed)
    assert (error.status, error.code) == (422, "invalid_value")
    assert error.param == f"nilrag.nodes.{index}.url"
    assert error.message.startswith(f"nilrag.nodes.{index}.url {reason}")
    assert no_requests(nilrag_nodes) == [[], [], []]


# ---------------------------------------------------------------- privacy


async def test_tokens_and_the_question_are_in_no_error_or_log(
    nilrag_nodes: list[StandInNode], caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    tokens = [node.state.token for node in nilrag_nodes]
    errors: list[NilaiError] = []

    async def collect(request: NilragRequest, **options: Any) -> None:
        errors.append(await failure(request, **options))

    async with retriever() as rag:
        retrieved = await rag.retrieve(request_for(entries(nilrag_nodes), 3), QUESTION)
    assert retrieved.chunks == distinct_top(3)

    down = entries(nilrag_nodes)
    down[1] = down_node(nilrag_nodes[1])
    await collect(request_for(down))
    refused = entries(nilrag_nodes)
    refused[0] = {**refused[0], "url": "http://169.254.169.254/api/v1"}
    await collect(request_for(refused))
    await collect(request_for(entries(nilrag_nodes)), allow=[], schemes=HTTPS_ONLY)
    for fault in (Fault.ERROR, Fault.MALFORMED, Fault.REDIRECT, Fault.HANG):
        nilrag_nodes[2].state.fail(fault)
        await collect(request_for(entries(nilrag_nodes)), timeout_s=0.3)
    nilrag_nodes[2].state.fail(None)
    nilrag_nodes[2].state.fail(Fault.MISSING, routes=["read"])
    await collect(request_for(entries(nilrag_nodes)))
    nilrag_nodes[2].state.fail(Fault.HANG)
    await collect(request_for(entries(nilrag_nodes)), deadline_s=0.3)

    # Every failure the retriever can report went through here.
    assert [error.status for error in errors] == [503, 422, 422, 502, 502, 502, 504, 502, 504]
    said = "\n".join(
        [
            caplog.text,
            *(record.getMessage() for record in caplog.records),
            *(str(error) for error in errors),
            *(repr(error.__cause__) for error in errors),
            *(repr(error.__context__) for error in errors),
        ]
    )
    assert caplog.records, "nothing to search: no log records were captured"
    for token in tokens:
        assert token not in said
    assert QUESTION not in said
    assert ERROR_MARKER not in said
    for chunk in CORPUS:
        assert chunk not in said
