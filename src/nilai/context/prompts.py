"""System prompts kept private in nilDB: where a request's prompt document comes from.

A NUC token may name a prompt document (``PromptDocument``: its id and its owner's DID). The
chat service asks a ``PromptVault`` for the prompt and puts it first, as a system message, in
what the model server receives; the client never sees it, and it is never logged, stored or
counted. ``CachedPrompts`` keeps revealed prompts in memory for a short while, so that a
conversation does not cost a round trip to every nilDB node per turn.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from nilai.auth.base import PromptDocument
from nilai.errors import ContextNotAccessible, ContextUnavailable

NOT_ACCESSIBLE = "The prompt document is not accessible."


class PromptVault(Protocol):
    """Reveals the system prompt held in a prompt document."""

    async def reveal(self, document: PromptDocument) -> str:
        """The prompt text.

        Raises:
            ContextUnavailable: The vault (a nilDB node) cannot be reached, or is not set up.
            ContextNotAccessible: The document does not exist, is not the named owner's, or
                the gateway may not read it.
            ContextCorrupt: What came back does not make a prompt.
        """
        ...


class PromptsOff:
    """The vault of a gateway without nilDB: every document is refused with a 503."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    async def reveal(self, document: PromptDocument) -> str:
        """Refuse: private prompts are not configured here."""
        raise ContextUnavailable(
            f"This token names a nilDB prompt document, but private prompts are not configured "
            f"on this gateway ({self._reason}); the request is refused rather than served "
            "without its prompt.",
            code="nildb_not_configured",
        )


class CachedPrompts:
    """Revealed prompts kept for ``ttl_s`` by (document, owner); failures are not kept.

    The cache holds prompt text in this process's memory only (inside the TEE), for at most
    ``ttl_s`` and ``max_entries`` documents; nothing is written anywhere.
    """

    def __init__(
        self,
        inner: PromptVault,
        *,
        ttl_s: float,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[PromptDocument, tuple[float, str]] = OrderedDict()

    async def reveal(self, document: PromptDocument) -> str:
        """The cached prompt while fresh, else the inner vault's (then cached)."""
        now = self._clock()
        entry = self._entries.get(document)
        if entry is not None and entry[0] > now:
            return entry[1]
        prompt = await self._inner.reveal(document)
        if self._ttl_s > 0:
            self._entries[document] = (self._clock() + self._ttl_s, prompt)
            self._entries.move_to_end(document)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return prompt


class MemoryPromptVault:
    """The in-memory twin: documents by (id, owner); ``down`` makes every read a 503."""

    def __init__(self) -> None:
        self.documents: dict[PromptDocument, str] = {}
        self.down = False
        self.reads = 0

    async def reveal(self, document: PromptDocument) -> str:
        """The stored prompt, or the error a real vault would raise."""
        self.reads += 1
        if self.down:
            raise ContextUnavailable("A nilDB node cannot be reached (test twin).")
        prompt = self.documents.get(document)
        if prompt is None:
            raise ContextNotAccessible(NOT_ACCESSIBLE)
        return prompt
