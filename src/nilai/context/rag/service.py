"""NilRAG as nilrag 0.1.11's client does it: share the question, rebuild distances, read chunks.

The question's embedding is secret-shared to the client's nilDB nodes, the distances are
reconstructed from their answers, and the closest chunks are read.

The nodes never see the question or the documents in the clear: each gets one additive share
of the question's embedding and answers with its shares of the differences to every stored
document; only the sum of all nodes' answers reveals the distances, and only here. The chunks
come back XOR-shared and are joined here too. Nothing of it (question, distances, chunks, the
client's node tokens) is logged or stored.

The CPU work (embedding the question, decoding the nodes' answers, the share arithmetic,
joining chunks) runs in the retriever's own bounded thread pool, never on the event loop: the
numpy and tokenizer work releases the GIL, and the JSON decoding of a large answer is a few
tens of milliseconds that a request must not stall every other one for. The node calls are
concurrent; the whole retrieval has a deadline (504 past it).

Failures say which node (its index in the request's ``nodes``) and what kind of failure,
never what the node answered: a refused URL is the client's (422), an unreachable node 503, a
slow one 504, nonsense 502.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nilai.context.rag.embed import Embedder
from nilai.context.rag.nodes import NilragNodes, NodeError, NodeRefused
from nilai.context.rag.retriever import Retrieved
from nilai.context.rag.shares import (
    ShareError,
    closest,
    decode_chunk,
    distances,
    parse_chunks,
    parse_differences,
    share_query,
)
from nilai.errors import (
    NilaiError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
    ValidationFailed,
)
from nilai.protocol.nilrag import NilragRequest

logger = logging.getLogger(__name__)

_REFUSED_REASONS = {
    "scheme": "must be https",
    "bad_url": "is not a usable URL",
    "forbidden_address": "resolves to an address that is not public (loopback, private, "
    "link-local or metadata)",
    "dns": "does not resolve",
}


class NilRag:
    """The ``Retriever`` of NilRAG requests, over the nodes each request names."""

    def __init__(
        self,
        embedder: Embedder,
        nodes: NilragNodes,
        *,
        deadline_s: float,
        max_documents: int,
        workers: int,
    ) -> None:
        self._embedder = embedder
        self._nodes = nodes
        self._deadline_s = deadline_s
        self._max_documents = max_documents
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nilai-nilrag")

    async def retrieve(self, request: NilragRequest, question: str) -> Retrieved:
        """The ``request.num_chunks`` chunks closest to ``question``, closest first.

        Raises:
            ValidationFailed: A node's URL may not be used (422; nothing was sent anywhere).
            UpstreamUnavailable: A node could not be reached (503).
            UpstreamTimeout: A node, or the whole retrieval, took too long (504).
            UpstreamProtocolError: A node answered something else than nilrag's shapes (502).
        """
        try:
            async with asyncio.timeout(self._deadline_s):
                return await self._retrieve(request, question)
        except TimeoutError:
            raise UpstreamTimeout(
                f"The NilRAG nodes did not answer within {self._deadline_s:g}s.",
                code="nilrag_timeout",
            ) from None
        except NodeRefused as refused:
            reason = _REFUSED_REASONS.get(refused.reason, "may not be used")
            param = f"nilrag.nodes.{refused.index}.url"
            raise ValidationFailed(
                f"{param} {reason}.", param=param, code="invalid_value"
            ) from None
        except NodeError as failed:
            raise _node_failure(failed) from None

    async def _retrieve(self, request: NilragRequest, question: str) -> Retrieved:
        nodes = request.nodes
        targets = await self._nodes.check(nodes)  # every URL checked before anything is sent
        embedding = await self._run(self._embedder.embed, question)
        shares = await self._run(share_query, embedding, len(nodes))
        answers = await _all(
            self._nodes.execute(index, node, target, shares[index])
            for index, (node, target) in enumerate(zip(nodes, targets, strict=True))
        )
        per_node = await _all(
            self._parsed(index, parse_differences, answer) for index, answer in enumerate(answers)
        )
        try:
            ids, found = await self._run(distances, per_node)
        except ShareError as exc:
            raise UpstreamProtocolError(
                f"The NilRAG nodes' answers do not agree ({exc.reason}).", code="nilrag_bad_answer"
            ) from None
        chosen = closest(ids, found, request.num_chunks)
        if not chosen:
            return Retrieved([])
        chunk_answers = await _all(
            self._nodes.read(index, node, target, chosen)
            for index, (node, target) in enumerate(zip(nodes, targets, strict=True))
        )
        chunk_shares = await _all(
            self._parsed(index, parse_chunks, answer) for index, answer in enumerate(chunk_answers)
        )
        chunks = await self._run(_join_chunks, chosen, chunk_shares)
        return Retrieved(chunks)

    async def _parsed[T](self, index: int, parse: Callable[..., T], answer: bytes) -> T:
        try:
            return await self._run(parse, answer, max_documents=self._max_documents)
        except ShareError as exc:
            raise UpstreamProtocolError(
                f"NilRAG node {index} answered something that is not nilrag's answer "
                f"({exc.reason}).",
                code="nilrag_bad_answer",
            ) from None

    async def _run[T](self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: work(*args, **kwargs))

    async def aclose(self) -> None:
        """Let the worker threads finish what they run, then stop them."""
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


def _join_chunks(ids: Sequence[str], per_node: Sequence[dict[str, str]]) -> list[str]:
    """The chunks of ``ids``, in that order, joined from every node's shares."""
    chunks: list[str] = []
    for document in ids:
        present: list[str] = []
        for index, answer in enumerate(per_node):
            share = answer.get(document)
            if share is None:
                raise UpstreamProtocolError(
                    f"NilRAG node {index} did not return a chunk that was asked for.",
                    code="nilrag_bad_answer",
                )
            present.append(share)
        try:
            chunks.append(decode_chunk(present))
        except ShareError as exc:
            raise UpstreamProtocolError(
                f"The NilRAG nodes' chunk shares do not join ({exc.reason}).",
                code="nilrag_bad_answer",
            ) from None
    return chunks


def _node_failure(failed: NodeError) -> NilaiError:
    index = failed.index
    match failed.kind:
        case "unreachable":
            return UpstreamUnavailable(
                f"NilRAG node {index} could not be reached; try again shortly.",
                code="nilrag_node_unavailable",
            )
        case "timeout":
            return UpstreamTimeout(
                f"NilRAG node {index} did not answer in time.", code="nilrag_timeout"
            )
        case "too_large":
            detail = "an answer over the size limit"
        case "redirect":
            detail = "a redirect (not followed)"
        case "status":
            detail = f"HTTP {failed.status_code}" if failed.status_code else "an unusable answer"
        case _:
            detail = "an unusable answer"
    return UpstreamProtocolError(f"NilRAG node {index} sent {detail}.", code="nilrag_bad_answer")


async def _all[T](calls: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``calls`` concurrently; the first failure (of the lowest node) cancels the rest."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks.extend(group.create_task(call) for call in calls)
    except* Exception as failures:  # noqa: BLE001 - one handler: two would raise a group of both
        raise _first(_leaves(failures)) from None
    return [task.result() for task in tasks]


def _first(errors: list[Exception]) -> Exception:
    """The failure of the lowest node index (else the first raised)."""
    indexed = [error for error in errors if isinstance(error, NodeError)]
    return min(indexed, key=lambda error: error.index) if indexed else errors[0]


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    leaves: list[Exception] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            leaves.extend(_leaves(error))
        else:
            leaves.append(error)
    return leaves
