"""nilrag's share arithmetic: query shares, node answers, distances, ranking and chunk shares.

The document side is built here the way nilrag's data owner does it, independently of the
product code: ``round(v * 10**7) mod p`` split into additive shares mod p, one per node, and
each node answering ``document_share - query_share`` per dimension as plain integers (what a
MongoDB ``$subtract`` pipeline gives, so possibly negative). Chunks are shared with XOR, by hand
and with blindfold's own ``store`` cluster key.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import uuid
from collections.abc import Sequence
from typing import Any

import blindfold  # pyright: ignore[reportMissingTypeStubs]
import numpy as np
import numpy.typing as npt
import pytest

from nilai.context.rag.shares import (
    DIMENSION,
    PRIME,
    SCALE,
    ShareError,
    closest,
    decode_chunk,
    distances,
    parse_chunks,
    parse_differences,
    share_query,
)

P = 4294967311  # 2**32 + 15, restated: the tests must not borrow the constant they check
MARKER = "SECRET-MARKER-7f3a"


def unit_vector(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    vector = rng.normal(size=DIMENSION)
    return vector / np.linalg.norm(vector)


def fixed_point(vector: Sequence[float]) -> list[int]:
    """nilrag's data owner: Python's round of v * 10**7, mod p."""
    return [round(value * 10**7) % P for value in vector]


def additive_shares(values: list[int], parties: int) -> list[list[int]]:
    """Additive shares mod p of each value, the last share fixing the sum."""
    shares = [[secrets.randbelow(P) for _ in values] for _ in range(parties - 1)]
    last = [
        (value - sum(column)) % P
        for value, column in zip(values, zip(*shares, strict=True), strict=True)
    ]
    return [*shares, last]


def node_answers(
    documents: dict[str, npt.NDArray[np.float64]],
    query_shares: list[list[int]],
    *,
    shuffle: random.Random | None = None,
) -> list[bytes]:
    """Each node's ``queries/execute`` body: document_share - query_share, per document."""
    parties = len(query_shares)
    per_document = {
        document_id: additive_shares(fixed_point(embedding.tolist()), parties)
        for document_id, embedding in documents.items()
    }
    bodies: list[bytes] = []
    for node in range(parties):
        ids = list(documents)
        if shuffle is not None:
            shuffle.shuffle(ids)
        data = [
            {
                "_id": document_id,
                "difference": [
                    share - query
                    for share, query in zip(
                        per_document[document_id][node], query_shares[node], strict=True
                    )
                ],
            }
            for document_id in ids
        ]
        bodies.append(json.dumps({"data": data}).encode())
    return bodies


def xor_shares(text: str, parties: int) -> list[str]:
    """XOR shares of blindfold's tagged encoding of ``text`` (0x01 then UTF-8)."""
    plain = b"\x01" + text.encode("utf-8")
    randoms = [secrets.token_bytes(len(plain)) for _ in range(parties - 1)]
    last = bytearray(plain)
    for share in randoms:
        for index, byte in enumerate(share):
            last[index] ^= byte
    return [base64.b64encode(share).decode() for share in [*randoms, bytes(last)]]


def blindfold_shares(text: str, parties: int) -> list[str]:
    """The shares blindfold 1.0 makes for a ``store`` cluster key (no secret material)."""
    key: object = blindfold.ClusterKey.generate({"nodes": [{}] * parties}, {"store": True})  # pyright: ignore[reportUnknownMemberType]
    shares: object = blindfold.encrypt(key, text)  # pyright: ignore[reportUnknownMemberType]
    assert isinstance(shares, list)
    strings = [share for share in shares if isinstance(share, str)]  # pyright: ignore[reportUnknownVariableType]
    assert len(strings) == parties
    return strings


def difference_body(items: list[Any]) -> bytes:
    return json.dumps({"data": items}).encode()


def good_item(document_id: str | None = None, value: int = 5) -> dict[str, Any]:
    identifier = str(uuid.uuid4()) if document_id is None else document_id
    return {"_id": identifier, "difference": [value] * DIMENSION}


# --- the constants ----------------------------------------------------------------------------


def test_the_constants_are_nilrags():
    assert (PRIME, SCALE, DIMENSION) == (P, 10**7, 384)
    assert P == 2**32 + 15


# --- share_query ------------------------------------------------------------------------------


@pytest.mark.parametrize("parties", [2, 3, 4, 5])
def test_query_shares_sum_to_the_fixed_point_values(parties: int):
    rng = np.random.default_rng(parties)
    embedding = unit_vector(rng)
    shares = share_query(embedding, parties)
    assert len(shares) == parties
    assert all(len(share) == DIMENSION for share in shares)
    assert all(type(value) is int and 0 <= value < P for share in shares for value in share)
    sums = [sum(column) % P for column in zip(*shares, strict=True)]
    assert sums == fixed_point(embedding.tolist())


def test_negative_values_wrap_around_the_modulus():
    embedding = np.zeros(DIMENSION)
    embedding[0], embedding[1], embedding[2] = -0.3, 0.25, -1.0
    shares = share_query(embedding, 3)
    sums = [sum(column) % P for column in zip(*shares, strict=True)]
    assert sums[:4] == [P - 3_000_000, 2_500_000, P - 10_000_000, 0]


@pytest.mark.parametrize("parties", [2, 3, 5])
def test_query_shares_look_random(parties: int):
    embedding = unit_vector(np.random.default_rng(7))
    plain = fixed_point(embedding.tolist())
    first = share_query(embedding, parties)
    second = share_query(embedding, parties)
    for share in first:
        assert share != plain
        # A uniform share rarely matches the plaintext anywhere, and never in many places.
        assert sum(a == b for a, b in zip(share, plain, strict=True)) <= 1
        # Uniform over [0, p): about half the values above p / 2 (384 draws: far from 0 or 384).
        assert 100 < sum(value > P // 2 for value in share) < 284
    # Fresh randomness on each call.
    assert first[0] != second[0]


@pytest.mark.parametrize(
    ("embedding", "parties"),
    [
        (np.zeros(DIMENSION - 1), 3),
        (np.zeros((2, DIMENSION)), 3),
        (np.full(DIMENSION, np.nan), 3),
        (np.full(DIMENSION, np.inf), 3),
        (np.zeros(DIMENSION), 0),
    ],
)
def test_share_query_refuses_what_it_cannot_share(embedding: npt.NDArray[Any], parties: int):
    with pytest.raises(ValueError, match=r"embedding|party"):
        share_query(embedding, parties)


# --- parse_differences ------------------------------------------------------------------------


def test_a_node_answer_is_read_in_the_nodes_order():
    rng = np.random.default_rng(1)
    rows = rng.integers(-P + 1, P, size=(3, DIMENSION))
    ids = [str(uuid.uuid4()) for _ in range(3)]
    body = difference_body(
        [
            {"_id": document_id, "difference": row.tolist(), "extra": "ignored"}
            for document_id, row in zip(ids, rows, strict=True)
        ]
    )
    parsed_ids, parsed = parse_differences(body, max_documents=3)
    assert parsed_ids == ids
    assert parsed.dtype == np.int64
    assert parsed.shape == (3, DIMENSION)
    assert (parsed == rows).all()


def test_an_answer_without_documents_is_empty():
    ids, rows = parse_differences(b'{"data": []}', max_documents=10)
    assert ids == []
    assert rows.shape == (0, DIMENSION)


def test_the_largest_differences_are_accepted():
    body = difference_body([good_item("a", P - 1), good_item("b", -(P - 1))])
    _, rows = parse_differences(body, max_documents=2)
    assert rows[0, 0] == P - 1
    assert rows[1, 0] == -(P - 1)


def with_value(value: Any) -> bytes:
    difference: list[Any] = [1] * DIMENSION
    difference[200] = value
    return difference_body([good_item("a"), {"_id": "b", "difference": difference}])


BAD_DIFFERENCES: list[tuple[str, bytes]] = [
    ("not JSON", f"{MARKER} {{".encode()),
    ("truncated JSON", difference_body([good_item(MARKER)])[:-2]),
    ("not UTF-8", b'{"data": ["\xff\xfe"]}'),
    ("not an object", json.dumps([MARKER]).encode()),
    ("no data", json.dumps({"documents": [MARKER]}).encode()),
    ("data not a list", json.dumps({"data": {MARKER: 1}}).encode()),
    ("data a string", json.dumps({"data": MARKER}).encode()),
    ("item not an object", difference_body([good_item(), MARKER])),
    ("item a list", difference_body([[MARKER]])),
    ("no _id", difference_body([{"difference": [1] * DIMENSION}])),
    ("_id not a string", difference_body([{"_id": 12345, "difference": [1] * DIMENSION}])),
    ("_id empty", difference_body([good_item(""), good_item()])),
    ("_id too long", difference_body([good_item(MARKER * 100)])),
    ("no difference", difference_body([{"_id": MARKER}])),
    ("difference not a list", difference_body([{"_id": MARKER, "difference": MARKER}])),
    ("difference too short", difference_body([{"_id": MARKER, "difference": [1] * 383}])),
    ("difference too long", difference_body([{"_id": MARKER, "difference": [1] * 385}])),
    ("difference empty", difference_body([{"_id": MARKER, "difference": []}])),
    ("a value is a string", with_value(MARKER)),
    ("a value is a bool", with_value(True)),
    ("a value is false", with_value(False)),
    ("a value is a float", with_value(12.5)),
    ("a value is an integral float", with_value(3.0)),
    ("a value is null", with_value(None)),
    ("a value is a list", with_value([1])),
    ("a value is too big", with_value(P)),
    ("a value is too negative", with_value(-P)),
    ("a value is over int64", with_value(2**63 + 1)),
    ("a value is over uint64", with_value(2**80)),
    ("a value is NaN", with_value(float("nan"))),
    ("a document twice", difference_body([good_item(MARKER), good_item(MARKER)])),
]


@pytest.mark.parametrize(
    "body", [body for _, body in BAD_DIFFERENCES], ids=[name for name, _ in BAD_DIFFERENCES]
)
def test_malformed_answers_are_refused_without_echoing_them(body: bytes):
    with pytest.raises(ShareError) as caught:
        parse_differences(body, max_documents=10)
    reason = caught.value.reason
    assert reason
    assert str(caught.value) == reason
    assert MARKER not in reason
    for echoed in ("12345", "12.5", str(P), str(2**80)):
        assert echoed not in reason


def test_more_documents_than_allowed_are_refused():
    body = difference_body([good_item() for _ in range(4)])
    assert len(parse_differences(body, max_documents=4)[0]) == 4
    with pytest.raises(ShareError, match="more than 3 documents"):
        parse_differences(body, max_documents=3)


# --- distances --------------------------------------------------------------------------------


@pytest.mark.parametrize("parties", [2, 3, 5])
def test_distances_equal_the_plaintext_distances(parties: int):
    rng = np.random.default_rng(100 + parties)
    query = unit_vector(rng)
    documents = {str(uuid.uuid4()): unit_vector(rng) for _ in range(30)}
    # The query itself (distance 0) and its opposite (distance 2, every dimension negative).
    same, opposite = str(uuid.uuid4()), str(uuid.uuid4())
    documents[same] = query.copy()
    documents[opposite] = -query
    bodies = node_answers(documents, share_query(query, parties), shuffle=random.Random(parties))
    per_node = [parse_differences(body, max_documents=100) for body in bodies]
    # The nodes really list the documents in different orders.
    assert len({tuple(ids) for ids, _ in per_node}) == parties

    ids, found = distances(per_node)

    assert ids == per_node[0][0]
    assert sorted(ids) == sorted(documents)
    expected = np.array([np.linalg.norm(documents[document_id] - query) for document_id in ids])
    assert found == pytest.approx(expected, abs=1e-6)
    assert found[ids.index(same)] == pytest.approx(0.0, abs=1e-6)
    assert found[ids.index(opposite)] == pytest.approx(2.0, abs=1e-6)


def test_the_closest_documents_are_the_plaintext_closest_in_order():
    rng = np.random.default_rng(5)
    query = unit_vector(rng)
    documents = {f"doc-{index:02d}": unit_vector(rng) for index in range(20)}
    bodies = node_answers(documents, share_query(query, 3), shuffle=random.Random(5))
    ids, found = distances([parse_differences(body, max_documents=20) for body in bodies])
    plaintext = sorted(documents, key=lambda name: float(np.linalg.norm(documents[name] - query)))
    assert closest(ids, found, 5) == plaintext[:5]


def three_nodes(count: int = 4) -> tuple[list[str], list[tuple[list[str], npt.NDArray[np.int64]]]]:
    rng = np.random.default_rng(count)
    query = unit_vector(rng)
    documents = {f"doc-{index}": unit_vector(rng) for index in range(count)}
    bodies = node_answers(documents, share_query(query, 3))
    return list(documents), [parse_differences(body, max_documents=100) for body in bodies]


def test_a_node_missing_a_document_is_refused():
    _, per_node = three_nodes()
    ids, rows = per_node[1]
    per_node[1] = (ids[:-1], rows[:-1])
    with pytest.raises(ShareError, match="same documents"):
        distances(per_node)


def test_a_node_with_an_extra_document_is_refused():
    _, per_node = three_nodes()
    ids, rows = per_node[2]
    per_node[2] = ([*ids, "doc-extra"], np.vstack([rows, rows[:1]]))
    with pytest.raises(ShareError, match="same documents"):
        distances(per_node)


def test_a_node_with_another_document_in_place_of_one_is_refused():
    _, per_node = three_nodes()
    ids, rows = per_node[1]
    per_node[1] = ([*ids[:-1], "doc-other"], rows)
    with pytest.raises(ShareError, match="same documents"):
        distances(per_node)


def test_the_first_node_missing_a_document_is_refused():
    _, per_node = three_nodes()
    ids, rows = per_node[0]
    per_node[0] = (ids[1:], rows[1:])
    with pytest.raises(ShareError, match="same documents"):
        distances(per_node)


def test_no_nodes_is_refused():
    with pytest.raises(ShareError, match="no node"):
        distances([])


def test_nodes_without_documents_give_no_distances():
    empty = np.zeros((0, DIMENSION), dtype=np.int64)
    ids, found = distances([([], empty), ([], empty)])
    assert ids == []
    assert found.shape == (0,)
    assert closest(ids, found, 2) == []


# --- closest ----------------------------------------------------------------------------------


def test_closest_orders_by_distance_and_keeps_k():
    ids = ["a", "b", "c", "d"]
    found = np.array([0.9, 0.1, 0.5, 0.3])
    assert closest(ids, found, 2) == ["b", "d"]
    assert closest(ids, found, 4) == ["b", "d", "c", "a"]
    assert closest(ids, found, 10) == ["b", "d", "c", "a"]
    assert closest(ids, found, 0) == []


def test_equal_distances_are_ordered_by_id():
    ids = ["zeta", "alpha", "mid", "beta"]
    found = np.array([0.5, 0.5, 0.2, 0.5])
    assert closest(ids, found, 4) == ["mid", "alpha", "beta", "zeta"]
    assert closest(list(reversed(ids)), found[::-1].copy(), 4) == ["mid", "alpha", "beta", "zeta"]


# --- parse_chunks -----------------------------------------------------------------------------


def test_chunk_answers_are_read_by_id():
    body = json.dumps(
        {"data": [{"_id": "a", "chunk": "AQID"}, {"_id": "b", "chunk": "BAUG", "x": 1}]}
    ).encode()
    assert parse_chunks(body, max_documents=2) == {"a": "AQID", "b": "BAUG"}


BAD_CHUNKS: list[tuple[str, bytes]] = [
    ("not JSON", f"<html>{MARKER}</html>".encode()),
    ("not an object", json.dumps([MARKER]).encode()),
    ("data not a list", json.dumps({"data": MARKER}).encode()),
    ("item not an object", json.dumps({"data": [MARKER]}).encode()),
    ("no _id", json.dumps({"data": [{"chunk": MARKER}]}).encode()),
    ("_id not a string", json.dumps({"data": [{"_id": 12345, "chunk": "AQID"}]}).encode()),
    ("no chunk", json.dumps({"data": [{"_id": MARKER}]}).encode()),
    ("chunk not a string", json.dumps({"data": [{"_id": "a", "chunk": 12345}]}).encode()),
    (
        "a document twice",
        json.dumps({"data": [{"_id": MARKER, "chunk": "AQID"}] * 2}).encode(),
    ),
    (
        "too many",
        json.dumps({"data": [{"_id": str(i), "chunk": "AQ=="} for i in range(3)]}).encode(),
    ),
]


@pytest.mark.parametrize(
    "body", [body for _, body in BAD_CHUNKS], ids=[name for name, _ in BAD_CHUNKS]
)
def test_malformed_chunk_answers_are_refused_without_echoing_them(body: bytes):
    with pytest.raises(ShareError) as caught:
        parse_chunks(body, max_documents=2)
    assert MARKER not in caught.value.reason
    assert "12345" not in caught.value.reason


# --- decode_chunk -----------------------------------------------------------------------------

TEXTS = [
    "Paris is the capital of France.",
    "Ünïcödé — 東京 ☃ and emoji 🎉",
    "",
    "x" * 4000,  # blindfold stores at most 4,096 bytes
]


@pytest.mark.parametrize("parties", [2, 3, 5])
@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "unicode", "empty", "long"])
def test_xor_shares_decode_to_the_text(text: str, parties: int):
    shares = xor_shares(text, parties)
    assert decode_chunk(shares) == text
    assert decode_chunk(list(reversed(shares))) == text


@pytest.mark.parametrize("parties", [2, 3, 5])
@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "unicode", "empty", "long"])
def test_blindfolds_own_shares_decode_to_the_text(text: str, parties: int):
    shares = blindfold_shares(text, parties)
    assert decode_chunk(shares) == text


def test_fewer_shares_than_were_made_do_not_reveal_the_text():
    text = "Paris is the capital of France."
    shares = blindfold_shares(text, 3)
    try:
        revealed: str | None = decode_chunk(shares[:2])
    except ShareError:
        revealed = None
    assert revealed != text


def test_shares_of_a_non_string_are_refused():
    key: object = blindfold.ClusterKey.generate({"nodes": [{}] * 3}, {"store": True})  # pyright: ignore[reportUnknownMemberType]
    shares: object = blindfold.encrypt(key, 12345)  # pyright: ignore[reportUnknownMemberType]
    assert isinstance(shares, list)
    with pytest.raises(ShareError, match="text"):
        decode_chunk([share for share in shares if isinstance(share, str)])  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]


def raw_shares(plain: bytes) -> list[str]:
    other = secrets.token_bytes(len(plain))
    last = bytes(a ^ b for a, b in zip(plain, other, strict=True))
    return [base64.b64encode(other).decode(), base64.b64encode(last).decode()]


@pytest.mark.parametrize(
    ("shares", "reason"),
    [
        (raw_shares(b"\x02binary " + MARKER.encode()), "text"),
        (raw_shares(b"\x00" + (5).to_bytes(8, "little")), "text"),
        (raw_shares(b"\x01\xff\xfe" + MARKER.encode()), "text"),
        ([base64.b64encode(b"\x01abc").decode(), base64.b64encode(b"\x00ab").decode()], "length"),
        (["AQID", "not base64!" + MARKER], "base64"),
        (["AQID", "AQI"], "base64"),
        (["AQID", MARKER], "base64"),
        (["", ""], "empty"),
        ([], "no chunk"),
    ],
    ids=[
        "binary tag",
        "integer tag",
        "not UTF-8",
        "unequal lengths",
        "bad characters",
        "bad padding",
        "not base64",
        "empty",
        "no shares",
    ],
)
def test_shares_that_do_not_combine_into_text_are_refused(shares: list[str], reason: str):
    with pytest.raises(ShareError, match=reason) as caught:
        decode_chunk(shares)
    assert MARKER not in caught.value.reason
