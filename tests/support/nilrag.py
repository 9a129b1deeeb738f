"""The data owner's side of nilrag 0.1.11, and stand-in nilDB nodes to hold what it shares.

``DataOwner`` does what nilrag's data owner does before any question is asked, written here
independently of the gateway's code (so a test compares the gateway against the protocol, not
against itself): for each text, its embedding (any object with ``embed(text) -> vector``: the
gateway's MiniLM embedder or its deterministic twin, passed in) scaled to integers
(``round(v * 10**7) mod p``, p = 2**32 + 15) and split into additive shares mod p, one per node;
and the text itself XOR-shared with ``blindfold`` (a cluster key for ``store``: the UTF-8
string tagged with its first byte 0x01, one base64 share per node). ``seed`` hands node i its
shares (``tests.fakes.nilrag``).

``plaintext_ranking`` is the answer a test expects: the texts ordered by Euclidean distance
between their embeddings and the question's, computed in the clear.

``running_nodes`` serves stand-in nodes on loopback; ``down_node`` is the URL of one that is
down (nothing listens on its port).
"""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import blindfold  # pyright: ignore[reportMissingTypeStubs]

from tests.fakes.nilrag import (
    API_ROOT,
    NilragNodeState,
    StoredDocument,
    create_nilrag_node_app,
)
from tests.support.servers import ServerThread, free_port

PRIME = 4294967311
"""nilrag's modulus for embedding shares: 2**32 + 15."""
SCALE = 10**7
"""nilrag's fixed-point scale for embedding values."""


class TextEmbedder(Protocol):
    """Anything that embeds a text as a vector (the gateway's embedders fit)."""

    def embed(self, text: str) -> Any: ...  # a 1-d numpy array of floats


@dataclass(frozen=True)
class OwnedDocument:
    """One document the data owner shared: its id on every node, and its text."""

    id: str
    text: str


def scaled(vector: Any) -> list[int]:
    """Each embedding value as nilrag's fixed-point integer mod p."""
    return [round(float(value) * SCALE) % PRIME for value in vector]


def additive_shares(values: list[int], parties: int) -> list[list[int]]:
    """``parties`` lists of shares mod p: per position, the shares sum to the value mod p."""
    shares = [[secrets.randbelow(PRIME) for _ in values] for _ in range(parties - 1)]
    last = [
        (value - sum(share[position] for share in shares)) % PRIME
        for position, value in enumerate(values)
    ]
    return [*shares, last]


def _cluster_key(parties: int) -> Any:
    # A cluster key for storage carries no secret material: the shares are plain XOR shares.
    return blindfold.ClusterKey.generate({"nodes": [{} for _ in range(parties)]}, {"store": True})  # pyright: ignore[reportUnknownMemberType]


def chunk_shares(text: str, parties: int) -> list[str]:
    """``text`` XOR-shared for ``parties`` nodes by blindfold: base64 shares, one per node."""
    shares: Any = blindfold.encrypt(_cluster_key(parties), text)  # pyright: ignore[reportUnknownMemberType]
    return [str(share) for share in shares]


def join_chunk(shares: Sequence[str]) -> str:
    """The text behind chunk shares, joined by blindfold (the reference the gateway must match)."""
    text: Any = blindfold.decrypt(_cluster_key(len(shares)), list(shares))  # pyright: ignore[reportUnknownMemberType]
    return str(text)


class DataOwner:
    """Shares a corpus across nodes as nilrag 0.1.11's data owner does; see the module docstring."""

    def __init__(self, embedder: TextEmbedder, parties: int) -> None:
        """Embed with ``embedder`` and share for ``parties`` nodes (2 or more)."""
        if parties < 2:
            raise ValueError("secret sharing needs two nodes or more")
        self.embedder = embedder
        self.parties = parties

    def share(
        self, texts: Sequence[str], ids: Sequence[str] | None = None
    ) -> tuple[list[OwnedDocument], list[list[StoredDocument]]]:
        """The documents (fresh UUIDs unless ``ids``), and for each node its shares of them."""
        chosen = list(ids) if ids is not None else [str(uuid.uuid4()) for _ in texts]
        if len(chosen) != len(texts):
            raise ValueError("one id per text")
        per_node: list[list[StoredDocument]] = [[] for _ in range(self.parties)]
        owned: list[OwnedDocument] = []
        for document_id, text in zip(chosen, texts, strict=True):
            embedding_shares = additive_shares(scaled(self.embedder.embed(text)), self.parties)
            text_shares = chunk_shares(text, self.parties)
            for node, (embedding, chunk) in enumerate(
                zip(embedding_shares, text_shares, strict=True)
            ):
                per_node[node].append(StoredDocument(document_id, embedding, chunk))
            owned.append(OwnedDocument(document_id, text))
        return owned, per_node

    def seed(
        self,
        states: Sequence[NilragNodeState],
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
    ) -> list[OwnedDocument]:
        """Store each node's shares of ``texts`` on it (one state per party, in order)."""
        if len(states) != self.parties:
            raise ValueError(f"this owner shares for {self.parties} nodes, not {len(states)}")
        owned, per_node = self.share(texts, ids)
        for state, documents in zip(states, per_node, strict=True):
            state.store(documents)
        return owned


def plaintext_distances(
    question: str, texts: Sequence[str], embedder: TextEmbedder
) -> list[tuple[str, float]]:
    """Each text with its embedding's Euclidean distance to the question's, closest first.

    Ties keep the corpus order.
    """
    asked = [float(value) for value in embedder.embed(question)]
    scored: list[tuple[float, int, str]] = []
    for position, text in enumerate(texts):
        vector = [float(value) for value in embedder.embed(text)]
        distance = math.sqrt(sum((a - b) ** 2 for a, b in zip(vector, asked, strict=True)))
        scored.append((distance, position, text))
    scored.sort()
    return [(text, distance) for distance, _, text in scored]


def plaintext_ranking(question: str, texts: Sequence[str], embedder: TextEmbedder) -> list[str]:
    """The texts ordered as a plaintext nearest-neighbour search ranks them for ``question``."""
    return [text for text, _ in plaintext_distances(question, texts, embedder)]


@dataclass
class StandInNode:
    """A stand-in node being served: its state and its server."""

    state: NilragNodeState
    server: ServerThread

    @property
    def url(self) -> str:
        """The node's API root, as a client names it."""
        return f"{self.server.url}{API_ROOT}"

    def node(self) -> dict[str, str]:
        """This node as an entry of a request's ``nilrag.nodes``."""
        return {
            "url": self.url,
            "bearer_token": self.state.token,
            "schema_id": self.state.schema_id,
            "diff_query_id": self.state.diff_query_id,
        }


@contextmanager
def running_nodes(
    count: int, *, host: str = "127.0.0.1", seed: int | None = None
) -> Generator[list[StandInNode]]:
    """``count`` stand-in nodes served on ``host`` (loopback), stopped on exit.

    ``seed`` makes their shuffles repeatable (node i gets ``seed + i``).
    """
    nodes: list[StandInNode] = []
    try:
        for index in range(count):
            state = NilragNodeState(seed=None if seed is None else seed + index)
            server = ServerThread(create_nilrag_node_app(state), host=host).start()
            nodes.append(StandInNode(state, server))
        yield nodes
    finally:
        for node in nodes:
            node.server.stop()


def down_node(template: StandInNode | None = None) -> dict[str, str]:
    """A request entry for a node that is down: nothing listens on its loopback port.

    Its ids and token are ``template``'s if given (so only the address is wrong), else fresh.
    """
    state = template.state if template is not None else NilragNodeState()
    return {
        "url": f"http://127.0.0.1:{free_port()}{API_ROOT}",
        "bearer_token": state.token,
        "schema_id": state.schema_id,
        "diff_query_id": state.diff_query_id,
    }
