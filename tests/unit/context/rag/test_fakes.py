"""The NilRAG test fixtures themselves: the data owner (tests.support.nilrag) and the stand-in
nilDB nodes (tests.fakes.nilrag), checked against the protocol done by hand here, never against
the gateway's own share code. If these were wrong, the gateway's tests would prove nothing.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import httpx
import numpy as np
import pytest

from nilai.context.rag.embed import HashEmbedder
from tests.fakes.nilrag import DIMENSION, ERROR_MARKER, Fault
from tests.support.nilrag import (
    PRIME,
    SCALE,
    DataOwner,
    StandInNode,
    additive_shares,
    chunk_shares,
    join_chunk,
    plaintext_distances,
    plaintext_ranking,
    running_nodes,
    scaled,
)

CORPUS = [
    "The lighthouse keeper counted ships in the winter storm.",
    "Otters returned to the estuary after the river was cleaned.",
    "A recipe for sourdough bread needs flour, water, salt and time.",
    "The orchestra tuned their violins before the concert began.",
    "Glaciers in the northern valley retreat a few metres each summer.",
    "The marathon runner drank water at every station along the route.",
    "Volcanic ash grounded flights across the region for three days.",
    "The library extended its opening hours during the exam period.",
    "Bees pollinate the apple orchard in early spring.",
    "The chess champion resigned after a long endgame.",
    "Solar panels on the school roof power the classrooms.",
    "The ferry to the island leaves every hour in summer.",
    "A new species of frog was found in the cloud forest.",
    "The bakery sells rye bread and cinnamon rolls on Sundays.",
    "Storm warnings closed the harbour and the lighthouse path.",
    "The museum displays a ledger of ships from the great storm.",
    "Engineers inspected the bridge cables after the earthquake.",
    "The choir rehearsed the anthem for the harbour festival.",
    "Wind turbines on the ridge turn even on calm days.",
    "The gardener planted tulips along the river walk.",
]
QUESTION = "How many ships did the lighthouse keeper count in the storm?"


def embedder() -> HashEmbedder:
    return HashEmbedder()


def by_hand_distances(nodes: list[StandInNode], question_vector: Any) -> dict[str, float]:
    """nilrag's client, done by hand: share the query, sum the differences mod p, unscale."""
    query_shares = additive_shares(scaled(question_vector), len(nodes))
    sums: dict[str, list[int]] = {}
    for node, share in zip(nodes, query_shares, strict=True):
        answer = httpx.post(
            f"{node.url}/queries/execute",
            json={"id": node.state.diff_query_id, "variables": {"query_embedding": share}},
            headers={"Authorization": f"Bearer {node.state.token}"},
            timeout=10,
        )
        assert answer.status_code == 200
        for item in answer.json()["data"]:
            total = sums.setdefault(item["_id"], [0] * DIMENSION)
            for position, value in enumerate(item["difference"]):
                total[position] += value
    distances: dict[str, float] = {}
    for document_id, total in sums.items():
        signed = [value % PRIME for value in total]
        values = [(value - PRIME if value > 2**31 - 1 else value) / SCALE for value in signed]
        distances[document_id] = math.sqrt(sum(value * value for value in values))
    return distances


def read_chunks(nodes: list[StandInNode], ids: list[str]) -> dict[str, list[str]]:
    shares: dict[str, list[str]] = {}
    for node in nodes:
        answer = httpx.post(
            f"{node.url}/data/read",
            json={"schema": node.state.schema_id, "filter": {"_id": {"$in": ids}}},
            headers={"Authorization": f"Bearer {node.state.token}"},
            timeout=10,
        )
        assert answer.status_code == 200
        for item in answer.json()["data"]:
            shares.setdefault(item["_id"], []).append(item["chunk"])
    return shares


# ---------------------------------------------------------------- the data owner


def test_embedding_shares_sum_to_the_scaled_values_mod_p():
    vector = np.array([0.5, -0.25, 0.0, 1.0, -1.0, 0.12345678])
    values = scaled(vector)
    assert values == [5_000_000, PRIME - 2_500_000, 0, 10_000_000, PRIME - 10_000_000, 1_234_568]
    shares = additive_shares(values, 3)
    assert len(shares) == 3
    assert all(0 <= value < PRIME for share in shares for value in share)
    assert [sum(column) % PRIME for column in zip(*shares, strict=True)] == values
    # Random shares: two sharings of the same values differ.
    assert additive_shares(values, 3)[0] != shares[0]


def test_chunk_shares_xor_to_the_tagged_utf8_text():
    text = "Ünïcode chunk: the lighthouse ledger, 412 ships."
    shares = chunk_shares(text, 3)
    assert len(shares) == 3
    raw = [base64.b64decode(share) for share in shares]
    joined = bytes(a ^ b ^ c for a, b, c in zip(*raw, strict=True))
    assert joined == b"\x01" + text.encode()
    assert join_chunk(shares) == text
    assert text.encode() not in raw  # no share is the text itself


def test_the_plaintext_ranking_orders_by_distance():
    ranking = plaintext_distances(QUESTION, CORPUS, embedder())
    assert [text for text, _ in ranking] == plaintext_ranking(QUESTION, CORPUS, embedder())
    distances = [distance for _, distance in ranking]
    assert distances == sorted(distances)
    assert ranking[0][0] == CORPUS[0]  # the sentence sharing the most words with the question


def test_an_owner_refuses_a_single_node_and_mismatched_states():
    with pytest.raises(ValueError, match="two nodes"):
        DataOwner(embedder(), 1)
    with running_nodes(2) as nodes, pytest.raises(ValueError, match="for 3 nodes"):
        DataOwner(embedder(), 3).seed([node.state for node in nodes], CORPUS)


# ---------------------------------------------------------------- seeded stand-ins


def test_three_seeded_nodes_give_back_the_plaintext_ranking_and_the_texts():
    model = embedder()
    with running_nodes(3, seed=7) as nodes:
        owned = DataOwner(model, 3).seed([node.state for node in nodes], CORPUS)
        assert [len(node.state.documents) for node in nodes] == [20, 20, 20]
        distances = by_hand_distances(nodes, model.embed(QUESTION))
        assert set(distances) == {document.id for document in owned}
        text_of = {document.id: document.text for document in owned}
        reconstructed = sorted(distances, key=lambda document_id: distances[document_id])
        expected = plaintext_distances(QUESTION, CORPUS, model)
        # Same order as the plaintext search, same distances up to the fixed-point rounding.
        assert [text_of[document_id] for document_id in reconstructed[:5]] == [
            text for text, _ in expected[:5]
        ]
        for document_id in reconstructed:
            plain = dict(expected)[text_of[document_id]]
            assert distances[document_id] == pytest.approx(plain, abs=1e-5)

        top = reconstructed[:3]
        chunks = read_chunks(nodes, top)
        assert set(chunks) == set(top)
        assert [join_chunk(chunks[document_id]) for document_id in top] == [
            text_of[document_id] for document_id in top
        ]


def test_each_node_lists_the_documents_in_its_own_order():
    with running_nodes(3, seed=11) as nodes:
        DataOwner(embedder(), 3).seed([node.state for node in nodes], CORPUS)
        orders: list[list[str]] = []
        for node in nodes:
            answer = httpx.post(
                f"{node.url}/queries/execute",
                json={
                    "id": node.state.diff_query_id,
                    "variables": {"query_embedding": [0] * DIMENSION},
                },
                headers={"Authorization": f"Bearer {node.state.token}"},
                timeout=10,
            )
            orders.append([item["_id"] for item in answer.json()["data"]])
        assert len({tuple(order) for order in orders}) == 3
        assert all(sorted(order) == sorted(orders[0]) for order in orders)


def test_a_node_stores_differences_as_plain_integers_share_minus_query():
    with running_nodes(2) as nodes:
        owner = DataOwner(embedder(), 2)
        [document] = owner.seed([node.state for node in nodes], ["one lonely document"])
        node = nodes[0]
        stored = node.state.documents[document.id].embedding
        query = [PRIME - 1] * DIMENSION
        answer = httpx.post(
            f"{node.url}/queries/execute",
            json={"id": node.state.diff_query_id, "variables": {"query_embedding": query}},
            headers={"Authorization": f"Bearer {node.state.token}"},
            timeout=10,
        )
        [item] = answer.json()["data"]
        assert item["difference"] == [value - (PRIME - 1) for value in stored]
        assert any(value < 0 for value in item["difference"])


# ---------------------------------------------------------------- auth, ids, recording, faults


def test_the_token_the_query_id_and_the_schema_are_checked():
    with running_nodes(2) as nodes:
        node = nodes[0]
        DataOwner(embedder(), 2).seed([n.state for n in nodes], CORPUS[:3])
        execute = f"{node.url}/queries/execute"
        body = {"id": node.state.diff_query_id, "variables": {"query_embedding": [1] * DIMENSION}}
        wrong = httpx.post(execute, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        missing = httpx.post(execute, json=body)
        assert missing.status_code == 401
        auth = {"Authorization": f"Bearer {node.state.token}"}
        other_query = httpx.post(
            execute, json={**body, "id": nodes[1].state.diff_query_id}, headers=auth
        )
        assert other_query.status_code == 404
        other_schema = httpx.post(
            f"{node.url}/data/read",
            json={"schema": nodes[1].state.schema_id, "filter": {"_id": {"$in": []}}},
            headers=auth,
        )
        assert other_schema.status_code == 404
        assert [(r.route, r.authorized) for r in node.state.requests] == [
            ("execute", False),
            ("execute", False),
            ("execute", True),
            ("read", True),
        ]
        assert node.state.requests[0].body == body
        assert node.state.requests[0].host == f"127.0.0.1:{node.server.port}"
        # What is recorded never holds the token.
        assert node.state.token not in repr(node.state.requests)


def test_faults_answer_as_documented():
    with running_nodes(2) as nodes:
        node = nodes[0]
        DataOwner(embedder(), 2).seed([n.state for n in nodes], CORPUS[:4])
        auth = {"Authorization": f"Bearer {node.state.token}"}
        execute = f"{node.url}/queries/execute"
        body = {"id": node.state.diff_query_id, "variables": {"query_embedding": [0] * DIMENSION}}

        node.state.fail(Fault.MISSING, ["execute"])
        assert len(httpx.post(execute, json=body, headers=auth).json()["data"]) == 3

        node.state.fail(Fault.MALFORMED)
        malformed = httpx.post(execute, json=body, headers=auth)
        assert malformed.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            malformed.json()

        node.state.fail(Fault.ERROR)
        error = httpx.post(execute, json=body, headers=auth)
        assert error.status_code == 500
        assert ERROR_MARKER in error.text

        node.state.fail(Fault.REDIRECT)
        redirect = httpx.post(execute, json=body, headers=auth)
        assert redirect.status_code == 307
        assert redirect.headers["location"] == "/api/v1/trap"

        node.state.fail(None)
        assert len(httpx.post(execute, json=body, headers=auth).json()["data"]) == 4
        assert node.state.routes() == ["execute"] * 5
