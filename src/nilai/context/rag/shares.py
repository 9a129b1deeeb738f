"""nilrag 0.1.11's share arithmetic: the query's additive shares, the distances, the chunks.

The data owner stores each document's embedding as additive shares mod ``PRIME`` of the
fixed-point values ``round(v * SCALE)``, one share per node, and each chunk as XOR shares
(blindfold's ``store`` operation). A query is shared the same way; each node answers with the
per-dimension difference ``document_share - query_share`` for every document, so the sum of the
nodes' differences mod ``PRIME`` is ``document - query`` in fixed point, and no node alone learns
anything about either.

Everything here is blocking CPU work on possibly large inputs (a node's answer for 1,000
documents is about 4 MB of JSON); callers run it in a worker pool. Errors are ``ShareError``
with a short fixed reason: the nodes' answers are never echoed, in errors or in logs.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import secrets
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import orjson

PRIME = 4294967311
"""The shares' modulus, 2**32 + 15 (nilql's ``sum`` operation for multi-node clusters)."""
SCALE = 10**7
"""Embedding values are shared as ``round(v * SCALE)``."""
DIMENSION = 384
"""all-MiniLM-L6-v2's embedding size."""

# Reconstructed values above this are negative numbers wrapped around the modulus.
_MAX_POSITIVE = 2**31 - 1
# The longest document id accepted (nilDB's are UUIDs, 36 characters): ids go back to the nodes
# in the chunk query, so an absurd one is refused here rather than echoed there.
_MAX_ID_LENGTH = 128
_STRING_TAG = 0x01  # blindfold's type byte for a UTF-8 string


class ShareError(ValueError):
    """A node's answer, or the shares taken together, are unusable.

    ``reason`` is short and fixed; it never includes what the node sent.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def share_query(embedding: npt.NDArray[np.float64], parties: int) -> list[list[int]]:
    """Additive shares mod ``PRIME`` of ``round(v * SCALE)`` for each value, one per party.

    The first ``parties - 1`` shares are uniform random (``secrets``); the last one makes the
    shares sum to the value mod ``PRIME``, so any ``parties - 1`` of them say nothing about it.

    Raises:
        ValueError: ``embedding`` is not a finite vector of ``DIMENSION`` values, or
            ``parties`` is below 1.
    """
    if embedding.shape != (DIMENSION,):
        raise ValueError(f"the embedding must have shape ({DIMENSION},)")
    if not bool(np.all(np.isfinite(embedding))):
        raise ValueError("the embedding must be finite")
    if parties < 1:
        raise ValueError("at least one party is needed")
    # np.rint rounds half to even, as Python's round() does in nilrag's client.
    fixed = np.mod(np.rint(embedding * SCALE).astype(np.int64), PRIME)
    shares = [[secrets.randbelow(PRIME) for _ in range(DIMENSION)] for _ in range(parties - 1)]
    taken = np.array(shares, dtype=np.int64).reshape(parties - 1, DIMENSION).sum(axis=0)
    last = np.mod(fixed - np.mod(taken, PRIME), PRIME)
    shares.append([int(value) for value in last])
    return shares


def _data(body: bytes, *, max_documents: int) -> list[dict[str, object]]:
    """The items of a ``{"data": [{...}, ...]}`` answer, each checked to be an object."""
    try:
        decoded: object = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ShareError("the answer is not JSON") from None
    if not isinstance(decoded, dict):
        raise ShareError("the answer is not a JSON object")
    data = decoded.get("data")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    if not isinstance(data, list):
        raise ShareError("the answer has no data list")
    items: list[object] = data  # pyright: ignore[reportUnknownVariableType]
    if len(items) > max_documents:
        raise ShareError(f"the answer lists more than {max_documents} documents")
    checked: list[dict[str, object]] = []
    for item in items:
        if not isinstance(item, dict):
            raise ShareError("a document is not a JSON object")
        checked.append(item)  # pyright: ignore[reportUnknownArgumentType]
    return checked


def _document_id(item: dict[str, object], seen: set[str]) -> str:
    identifier = item.get("_id")
    if not isinstance(identifier, str) or not 0 < len(identifier) <= _MAX_ID_LENGTH:
        raise ShareError("a document has no usable _id")
    if identifier in seen:
        raise ShareError("a document is listed twice")
    seen.add(identifier)
    return identifier


def parse_differences(
    body: bytes, *, max_documents: int
) -> tuple[list[str], npt.NDArray[np.int64]]:
    """A node's ``queries/execute`` answer: the document ids and their differences' shares.

    The answer is ``{"data": [{"_id": str, "difference": [DIMENSION ints]}, ...]}``; the
    result is the ids in the node's order and an int64 array of shape (documents, DIMENSION),
    row i for ids[i].

    Raises:
        ShareError: The body is not that shape: not JSON, no data list, a document that is not
            an object, without a string ``_id``, listed twice, or whose difference is not a list
            of ``DIMENSION`` integers (booleans and floats are not integers) each within
            ``PRIME`` of zero; or more than ``max_documents`` documents.
    """
    items = _data(body, max_documents=max_documents)
    seen: set[str] = set()
    ids: list[str] = []
    rows: list[list[object]] = []
    for item in items:
        ids.append(_document_id(item, seen))
        difference = item.get("difference")
        if not isinstance(difference, list) or len(difference) != DIMENSION:  # pyright: ignore[reportUnknownArgumentType]
            raise ShareError(f"a difference is not a list of {DIMENSION} values")
        rows.append(difference)  # pyright: ignore[reportUnknownArgumentType]
    # One C-level pass over every value's type: JSON true/false would pass numpy's int64
    # conversion as 1/0, and floats would be truncated, so only exact ints are accepted.
    if set(map(type, itertools.chain.from_iterable(rows))) - {int}:
        raise ShareError("a difference holds a value that is not an integer")
    if not rows:
        return ids, np.zeros((0, DIMENSION), dtype=np.int64)
    try:
        differences = np.array(rows, dtype=np.int64)
    except OverflowError:
        raise ShareError("a difference holds a value out of range") from None
    # A share is below PRIME, so a difference of two is within PRIME of zero; the bound also
    # keeps the sum of five nodes' rows far from int64 overflow.
    if int(np.abs(differences).max()) >= PRIME:
        raise ShareError("a difference holds a value out of range")
    return ids, differences


def distances(
    per_node: Sequence[tuple[list[str], npt.NDArray[np.int64]]],
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """The distance from the query to every document, from all nodes' differences.

    Rows are matched by document id (each node may list the documents in any order); the
    result follows the first node's order. Per document and dimension the nodes' values are
    summed mod ``PRIME``, values above ``2**31 - 1`` taken as negative, divided by ``SCALE``;
    the distance is the Euclidean norm of that vector.

    Raises:
        ShareError: No nodes, or the nodes do not list the same documents.
    """
    if not per_node:
        raise ShareError("no node answered")
    ids, first = per_node[0]
    total = first.copy()
    for other_ids, other in per_node[1:]:
        if len(other_ids) != len(ids) or other.shape != first.shape:
            raise ShareError("the nodes do not hold the same documents")
        if other_ids == ids:
            total += other
            continue
        row_of = {identifier: row for row, identifier in enumerate(other_ids)}
        try:
            order = [row_of[identifier] for identifier in ids]
        except KeyError:
            raise ShareError("the nodes do not hold the same documents") from None
        total += other[order]
    fixed = np.mod(total, PRIME)
    fixed[fixed > _MAX_POSITIVE] -= PRIME
    vectors = fixed.astype(np.float64) / SCALE
    return list(ids), np.linalg.norm(vectors, axis=1)


def closest(ids: Sequence[str], distances: npt.NDArray[np.float64], k: int) -> list[str]:
    """The ids of the ``k`` closest documents, closest first; equal distances by id."""
    values = distances.tolist()
    order = sorted(range(len(ids)), key=lambda row: (values[row], ids[row]))
    return [ids[row] for row in order[: max(k, 0)]]


def parse_chunks(body: bytes, *, max_documents: int) -> dict[str, str]:
    """A node's ``data/read`` answer: each document's chunk share (base64), by id.

    Raises:
        ShareError: The body is not ``{"data": [{"_id": str, "chunk": str}, ...]}``, lists a
            document twice, or lists more than ``max_documents`` documents.
    """
    items = _data(body, max_documents=max_documents)
    seen: set[str] = set()
    chunks: dict[str, str] = {}
    for item in items:
        identifier = _document_id(item, seen)
        chunk = item.get("chunk")
        if not isinstance(chunk, str):
            raise ShareError("a document has no chunk share")
        chunks[identifier] = chunk
    return chunks


def decode_chunk(shares: Sequence[str]) -> str:
    """The text that the nodes' XOR shares of one chunk hide (blindfold's ``store`` shares).

    Raises:
        ShareError: A share is not base64, the shares differ in length, or together they are
            not a tagged UTF-8 string.
    """
    if not shares:
        raise ShareError("no chunk shares")
    try:
        decoded = [base64.b64decode(share, validate=True) for share in shares]
    except (binascii.Error, ValueError):
        raise ShareError("a chunk share is not base64") from None
    length = len(decoded[0])
    if any(len(share) != length for share in decoded):
        raise ShareError("the chunk shares differ in length")
    if length == 0:
        raise ShareError("the chunk shares are empty")
    # XOR as big integers: one C-level operation per share instead of a loop per byte.
    combined = 0
    for share in decoded:
        combined ^= int.from_bytes(share, "big")
    plain = combined.to_bytes(length, "big")
    if plain[0] != _STRING_TAG:
        raise ShareError("the chunk shares do not combine into text")
    try:
        return plain[1:].decode("utf-8")
    except UnicodeDecodeError:
        raise ShareError("the chunk shares do not combine into text") from None


class NodeAnswerError(ShareError):
    """One node's answer is unusable; ``index`` is the node's position in the request."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.args = (index, reason)  # pickled as (index, reason): it crosses process pools


def rank(answers: Sequence[bytes], *, max_documents: int, k: int) -> list[str]:
    """Every node's ``queries/execute`` answer, read and combined: the ``k`` closest ids.

    One call for the whole reconstruction, so that a worker process receives the raw answers
    and returns only the chosen ids.

    Raises:
        NodeAnswerError: A node's answer is malformed (naming the node).
        ShareError: The answers are well-formed but do not agree (other documents).
    """
    per_node: list[tuple[list[str], npt.NDArray[np.int64]]] = []
    for index, answer in enumerate(answers):
        try:
            per_node.append(parse_differences(answer, max_documents=max_documents))
        except ShareError as exc:
            raise NodeAnswerError(index, exc.reason) from None
    ids, found = distances(per_node)
    return closest(ids, found, k)


def join_chunks(answers: Sequence[bytes], ids: Sequence[str], *, max_documents: int) -> list[str]:
    """Every node's ``data/read`` answer, read and joined: the chunks of ``ids``, in order.

    Raises:
        NodeAnswerError: A node's answer is malformed or lacks one of ``ids`` (naming it).
        ShareError: The shares of a chunk do not join into text.
    """
    per_node: list[dict[str, str]] = []
    for index, answer in enumerate(answers):
        try:
            per_node.append(parse_chunks(answer, max_documents=max_documents))
        except ShareError as exc:
            raise NodeAnswerError(index, exc.reason) from None
    chunks: list[str] = []
    for document in ids:
        shares: list[str] = []
        for index, chunks_of_node in enumerate(per_node):
            share = chunks_of_node.get(document)
            if share is None:
                raise NodeAnswerError(index, "a chunk that was asked for is missing")
            shares.append(share)
        chunks.append(decode_chunk(shares))
    return chunks


def ready() -> bool:
    """A no-op a worker process runs once at start-up: the module (and numpy) are imported."""
    return True
