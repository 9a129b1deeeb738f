"""NilRAG as nilrag 0.1.11's client does it: share the question, rebuild distances, read chunks.

The question's embedding is secret-shared to the client's nilDB nodes, the distances are
reconstructed from their answers, and the closest chunks are read.

The nodes never see the question or the documents in the clear: each gets one additive share
of the question's embedding and answers with its shares of the differences to every stored
document; only the sum of all nodes' answers reveals the distances, and only here. The chunks
come back XOR-shared and are joined here too. Nothing of it (question, distances, chunks, the
client's node tokens) is logged or stored.

The CPU work runs off the event loop, in the retriever's own bounded pools: the question's
embedding in threads (torch releases the GIL), and the decoding of the nodes' answers, the
share arithmetic and the joining of chunks in worker processes (decoding megabytes of JSON
holds the GIL for tens of milliseconds at a time: in a thread it would stall the loop as much).
The node calls are concurrent; the whole retrieval has a deadline (504 past it).

Failures say which node (its index in the request's ``nodes``) and what kind of failure,
never what the node answered: a refused URL is the client's (422), an unreachable node 503, a
slow one 504, nonsense 502.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from nilai.context.rag.embed import Embedder
from nilai.context.rag.nodes import NilragNodes, NodeError, NodeRefused
from nilai.context.rag.retriever import Retrieved
from nilai.context.rag.shares import (
    NodeAnswerError,
    ShareError,
    join_chunks,
    rank,
    ready,
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
        decoders: Executor | None = None,
    ) -> None:
        """Retrieve with ``embedder`` over ``nodes``.

        ``workers`` threads embed questions; ``decoders`` (``workers`` processes if unset)
        read the nodes' answers and do the share arithmetic.
        """
        self._embedder = embedder
        self._nodes = nodes
        self._deadline_s = deadline_s
        self._max_documents = max_documents
        self._workers = workers
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nilai-nilrag")
        self._decoders = decoders if decoders is not None else decoder_pool(workers)

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
        embedding = await self._embed(question)
        shares = share_query(embedding, len(nodes))
        answers = await _all(
            self._nodes.execute(index, node, target, shares[index])
            for index, (node, target) in enumerate(zip(nodes, targets, strict=True))
        )
        limit = self._max_documents
        chosen = await self._decode(rank, answers, max_documents=limit, k=request.num_chunks)
        if not chosen:
            return Retrieved([])
        chunk_answers = await _all(
            self._nodes.read(index, node, target, chosen)
            for index, (node, target) in enumerate(zip(nodes, targets, strict=True))
        )
        chunks = await self._decode(join_chunks, chunk_answers, chosen, max_documents=limit)
        return Retrieved(chunks)

    async def _embed(self, question: str) -> npt.NDArray[np.float64]:
        """The question's embedding, computed in a worker thread (torch releases the GIL)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._embedder.embed, question)

    async def _decode[T](self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``work`` (reading nodes' answers, share arithmetic) in a worker process.

        A process, not a thread: decoding megabytes of JSON holds the interpreter lock for tens
        of milliseconds at a time, which in a thread would stall the event loop just as much.
        """
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._decoders, partial(work, *args, **kwargs))
        except NodeAnswerError as exc:
            raise UpstreamProtocolError(
                f"NilRAG node {exc.index} sent an answer that is not nilrag's ({exc.reason}).",
                code="nilrag_bad_answer",
            ) from None
        except ShareError as exc:
            raise UpstreamProtocolError(
                f"The NilRAG nodes' answers do not agree ({exc.reason}).", code="nilrag_bad_answer"
            ) from None

    def warm_up(self) -> None:
        """Start every decoder process (blocking: call it off the event loop, at start-up).

        A process pool starts its workers on first use; each imports numpy, which takes a
        second or more that no request should wait for.
        """
        futures = [self._decoders.submit(ready) for _ in range(self._workers)]
        for future in futures:
            future.result(timeout=120)

    async def aclose(self) -> None:
        """Let the workers finish what they run, then stop them."""
        await asyncio.to_thread(self._threads.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._decoders.shutdown, wait=True, cancel_futures=True)


def decoder_pool(workers: int) -> Executor:
    """Worker processes for the decoding, started fresh (``spawn``), never forked.

    Where processes cannot be had (no working ``sem_open``, as in some sandboxes), threads,
    said once: then a large answer slows the event loop.
    """
    try:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(max_workers=workers, mp_context=context)
    except (OSError, ImportError, NotImplementedError) as exc:
        logger.warning(
            "NilRAG: the nodes' answers are decoded in threads, not processes (%s); under load "
            "it slows the event loop",
            type(exc).__name__,
        )
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nilai-nilrag-decode")


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
