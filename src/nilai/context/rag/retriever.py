"""The NilRAG stage's interface: retrieve the chunks closest to a question, or say why not.

The gateway sees only ``Retriever``; ``nilai.context.rag.service.NilRag`` is the real one (the
nilrag 0.1.11 protocol over nilDB nodes), imported only when NilRAG is enabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from nilai.protocol.nilrag import NilragRequest

NOT_CONFIGURED = "NILAI_NILRAG_ENABLED is off"


@dataclass(frozen=True, slots=True)
class Retrieved:
    """The chunks the nodes' documents gave for a question, closest first."""

    chunks: list[str]


class Retriever(Protocol):
    """Finds the documents closest to a question among the client's secret-shared ones."""

    async def retrieve(self, request: NilragRequest, question: str) -> Retrieved:
        """The ``request.num_chunks`` chunks closest to ``question``, closest first.

        Raises:
            NilaiError: A node is refused (422 naming it), down (503), too slow (504) or
                answers nonsense (502); the nodes' answers are never echoed.
        """
        ...

    async def aclose(self) -> None:
        """Release what the retriever holds (its worker pool)."""
        ...


def context_message(chunks: list[str]) -> str:
    """The text added to the prompt for the retrieved chunks (closest first)."""
    numbered = "\n\n".join(f"[{index}] {chunk}" for index, chunk in enumerate(chunks, start=1))
    return (
        "Relevant context from the user's documents, most relevant first. Use it to answer "
        "when it helps.\n\n" + numbered
    )
