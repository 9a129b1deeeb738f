"""Reading prompt documents from nilDB nodes as the gateway (the collection's builder).

Each node holds one share of the document's ``prompt``; only all shares together reveal it.
``NilDBPromptVault`` reads the document from **every** node (one signed NUC invocation per node,
addressed to that node's DID from its ``/about``), checks that each copy is the named owner's
document, and combines the shares with blindfold (imported on first use: a gateway without
nilDB never loads it). Whatever goes wrong, no share is ever used as text:

- a node unreachable, slow or answering 5xx → ``ContextUnavailable`` (503);
- the document missing or not readable by the gateway on a node → ``ContextNotAccessible`` (403);
- copies that disagree, shares that do not combine into a string, a prompt over the size limit
  → ``ContextCorrupt`` (502).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import cast

import httpx

# nuc and secp256k1 ship no type information; pyright reads their source instead.
from nuc.builder import NucTokenBuilder  # pyright: ignore[reportMissingTypeStubs]
from nuc.token import Command, Did  # pyright: ignore[reportMissingTypeStubs]
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]

from nilai.auth.base import PromptDocument
from nilai.context.nilauth import did_from_text, did_of_key
from nilai.context.prompts import NOT_ACCESSIBLE
from nilai.errors import ContextCorrupt, ContextNotAccessible, ContextUnavailable
from nilai.outages import OutageLog, mask_url
from nilai.protocol.base import json_object
from nilai.settings import UUID

logger = logging.getLogger(__name__)

USERS_READ = Command(["nil", "db", "users", "read"])
_INVOCATION_TTL_S = 60
_CONSEQUENCE = "chats whose token names a prompt document get 503 until it answers"
_NOT_READABLE = (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN, HTTPStatus.NOT_FOUND)
"""What a node answers for a document it does not hold for that owner, or not for us."""


class NodeDown(Exception):
    """A node could not be reached or answered with a server error."""


class _NotReadable(Exception):
    """A node says the document is not there, or not the gateway's to read."""


class NilDBPromptVault:
    """The real ``PromptVault``: the document's shares from every node, combined."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        nodes: list[str],
        key: PrivateKey,
        collection: str,
        *,
        timeout_s: float,
        max_prompt_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._nodes = nodes
        self._key = key
        self._collection = collection
        self._timeout_s = timeout_s
        self._max_prompt_bytes = max_prompt_bytes
        self._clock = clock
        self._node_dids: dict[str, Did] = {}
        # One warning when a node stops answering, reminders, one when it is back: not a line
        # per request while it is down.
        self._outages = {
            node: OutageLog(logger, "nilDB node", _CONSEQUENCE, where=mask_url(node))
            for node in nodes
        }

    async def reveal(self, document: PromptDocument) -> str:
        """The prompt; see ``PromptVault.reveal``."""
        if not UUID.fullmatch(document.document_id):
            raise ContextNotAccessible(NOT_ACCESSIBLE)
        owner = _owner_did(document.owner_did)
        results = await asyncio.gather(
            *(self._read(node, document.document_id, owner) for node in self._nodes),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, NodeDown | _NotReadable | ContextCorrupt):
                raise failure  # a bug or a cancellation: not the nodes' doing
        if any(isinstance(f, NodeDown) for f in failures):
            raise ContextUnavailable(
                "A nilDB node holding the prompt document cannot be reached; the prompt cannot "
                "be revealed without every node's share. Try again later.",
                code="nildb_unavailable",
            )
        if any(isinstance(f, _NotReadable) for f in failures):
            raise ContextNotAccessible(NOT_ACCESSIBLE)
        if failures:
            raise failures[0]
        documents = [cast("dict[str, object]", r) for r in results]
        return self._combine(documents, document)

    def _combine(self, documents: list[dict[str, object]], document: PromptDocument) -> str:
        shares: list[str] = []
        for copy in documents:
            owner = copy.get("_owner")
            same_owner = isinstance(owner, str) and owner.lower() == document.owner_did.lower()
            if copy.get("_id") != document.document_id or not same_owner:
                raise _corrupt("a node returned another document, or another owner's")
            prompt = json_object(copy.get("prompt"))
            share = prompt.get("%share") if prompt is not None else None
            if not isinstance(share, str):
                raise _corrupt("a node's copy has no share of the prompt")
            shares.append(share)
        text = _reveal(shares)
        if len(text.encode()) > self._max_prompt_bytes:
            raise _corrupt(f"the prompt is longer than {self._max_prompt_bytes} bytes")
        return text

    async def _read(self, node: str, document_id: str, owner: Did) -> dict[str, object]:
        outage = self._outages[node]
        started = time.monotonic()
        try:
            data = await self._read_from(node, document_id, owner)
        except NodeDown as exc:
            outage.failed(exc, started=started)
            raise
        outage.answered(started=started)
        return data

    async def _read_from(self, node: str, document_id: str, owner: Did) -> dict[str, object]:
        did = await self._node_did(node)
        token = (
            NucTokenBuilder.invocation({})
            .command(USERS_READ)
            .subject(owner)
            .audience(did)
            .expires_at(datetime.fromtimestamp(self._clock() + _INVOCATION_TTL_S, UTC))
            .build(self._key)
        )
        url = f"{node}/v1/users/data/{self._collection}/{document_id}"
        try:
            response = await self._http.get(
                url, headers={"Authorization": f"Bearer {token}"}, timeout=self._timeout_s
            )
        except httpx.HTTPError as exc:
            raise NodeDown(type(exc).__name__) from None
        if response.status_code >= HTTPStatus.INTERNAL_SERVER_ERROR:
            raise NodeDown(f"status {response.status_code}")
        if response.status_code in _NOT_READABLE:
            raise _NotReadable
        if response.status_code != HTTPStatus.OK:
            raise _corrupt(f"a node answered with status {response.status_code}")
        try:
            body: object = response.json()
        except ValueError:
            raise _corrupt("a node's answer is not JSON") from None
        answer = json_object(body)
        data = json_object(answer.get("data")) if answer is not None else None
        if data is None:
            raise _corrupt("a node's answer holds no document")
        return data

    async def _node_did(self, node: str) -> Did:
        did = self._node_dids.get(node)
        if did is not None:
            return did
        try:
            response = await self._http.get(f"{node}/about", timeout=self._timeout_s)
            response.raise_for_status()
            about: object = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise NodeDown(f"/about: {type(exc).__name__}") from None
        fields = json_object(about)
        key = fields.get("public_key") if fields is not None else None
        did = did_of_key(key) if isinstance(key, str) else None
        if did is None:
            raise NodeDown("/about has no usable public key")
        self._node_dids[node] = did
        return did


def _owner_did(value: str) -> Did:
    did = did_from_text(value)
    if did is None:
        raise ContextNotAccessible(NOT_ACCESSIBLE)
    return did


def _corrupt(why: str) -> ContextCorrupt:
    logger.warning("prompt document rejected: %s", why)
    return ContextCorrupt(
        "The prompt document's shares from the nilDB nodes do not fit together; it was not used."
    )


def _reveal(shares: list[str]) -> str:
    """Combine one share per node (blindfold's ``store`` cluster key, no threshold)."""
    # Imported here: a gateway without nilDB never loads it (an optional extra, nilai[nildb]).
    import blindfold  # noqa: PLC0415  # pyright: ignore[reportMissingTypeStubs]

    cluster: dict[str, list[dict[str, object]]] = {"nodes": [{} for _ in shares]}
    key: object = blindfold.ClusterKey.generate(cluster, {"store": True})  # pyright: ignore[reportUnknownMemberType]
    try:
        value: object = blindfold.decrypt(key, shares)
    except Exception as exc:  # noqa: BLE001 - whatever blindfold refuses is a corrupt document
        raise _corrupt(f"the shares do not combine ({type(exc).__name__})") from None
    if not isinstance(value, str):
        raise _corrupt("the shares do not combine into text")
    return value
