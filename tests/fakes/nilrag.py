"""A loopback stand-in for one nilDB node as nilrag 0.1.11's client uses it, for NilRAG tests.

Run two to five of them (``tests.support.nilrag.running_nodes``), each holding its own shares of
every document; ``tests.support.nilrag.DataOwner`` seeds them as nilrag's data owner would. The
node's API root is ``{server}/api/v1`` (``API_ROOT``), the URL a client puts in its request.

Routes (both ``POST``, both need ``Authorization: Bearer <state.token>``, else ``401``):

- ``/api/v1/queries/execute`` ``{"id": <diff_query_id>, "variables": {"query_embedding":
  [384 ints]}}`` -> ``{"data": [{"_id", "difference": [384 ints]}, ...]}``, where
  ``difference = document share - query share`` per dimension, as plain integers (negative ones
  included), as nilDB's MongoDB ``$subtract`` pipeline gives: summing them mod p is the
  client's job. Another query id -> ``404``.
- ``/api/v1/data/read`` ``{"schema": <schema_id>, "filter": {"_id": {"$in": [ids]}}}`` ->
  ``{"data": [{"_id", "chunk": <base64 share>}, ...]}`` for the ids it holds. Another schema ->
  ``404``.

Each node lists documents in its own shuffled order (a fresh shuffle per answer), so a client
must align them by ``_id``. ``state.requests`` records every request that reached a route
(``/api/v1/trap`` included, the default redirect target): the route, the JSON body (``None``
if it did not parse), whether the bearer token matched, and the ``Host`` header; never the
token itself.

Faults (``state.fail(fault, routes)``; both routes unless said):

- ``hang``: never answers; ``state.hung_up`` counts clients that gave up waiting.
- ``redirect``: ``307`` to ``state.redirect_to`` (default ``/api/v1/trap``, which records and
  answers ``200`` ``{"data": []}``).
- ``huge``: ``200`` with ``state.huge_bytes`` (50 MB) of JSON-looking bytes, streamed, no
  ``Content-Length``; ``state.huge_bytes_sent`` counts what went out before the client hung up.
- ``error``: ``500`` with a body holding ``ERROR_MARKER`` (it must never reach a client).
- ``malformed``: ``200`` with a body that is not JSON.
- ``missing``: the answer leaves out one document the node holds (the first of its shuffle).

A node that is down is a port nothing listens on (``tests.support.nilrag.down_node``).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

API_ROOT = "/api/v1"
DIMENSION = 384
HUGE_BYTES = 50 * 1000 * 1000
HUGE_CHUNK = b'{"_id":"00000000-0000-0000-0000-000000000000","difference":[1,2,3]},' * 1000
ERROR_MARKER = "nildb-internal-stack-trace-marker"


class Fault(StrEnum):
    """What a stand-in node does instead of answering normally."""

    HANG = "hang"
    REDIRECT = "redirect"
    HUGE = "huge"
    ERROR = "error"
    MALFORMED = "malformed"
    MISSING = "missing"


ROUTES = ("execute", "read")


@dataclass
class StoredDocument:
    """One document as this node holds it: shares only, never the text or the embedding."""

    id: str
    embedding: list[int]
    """This node's additive share (mod p) of each scaled embedding value."""
    chunk: str
    """This node's XOR share of the tagged UTF-8 text, base64."""


@dataclass
class Recorded:
    """A request that reached a route."""

    route: str
    body: Any
    authorized: bool
    host: str


@dataclass
class NilragNodeState:
    """One stand-in node: its credentials and ids, its documents, its faults, what it saw."""

    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    schema_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    diff_query_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    documents: dict[str, StoredDocument] = field(default_factory=dict[str, StoredDocument])
    faults: dict[str, Fault] = field(default_factory=dict[str, Fault])
    redirect_to: str = f"{API_ROOT}/trap"
    hang_s: float = 60.0
    huge_bytes: int = HUGE_BYTES
    huge_bytes_sent: int = 0
    hung_up: int = 0
    requests: list[Recorded] = field(default_factory=list[Recorded])
    seed: int | None = None
    """Seeds the per-answer shuffles (a random seed if unset)."""

    def __post_init__(self) -> None:
        # A shuffle, not a secret: a seedable generator so that tests can repeat one.
        self._random = random.Random(self.seed)

    def fail(self, fault: Fault | None, routes: Iterable[str] = ROUTES) -> None:
        """Make ``routes`` misbehave with ``fault`` from now on (``None``: behave again)."""
        for route in routes:
            if fault is None:
                self.faults.pop(route, None)
            else:
                self.faults[route] = fault

    def store(self, documents: Iterable[StoredDocument]) -> None:
        """Hold these documents' shares (replacing any with the same id)."""
        for document in documents:
            self.documents[document.id] = document

    def routes(self) -> list[str]:
        """The routes requested, in order."""
        return [recorded.route for recorded in self.requests]

    def shuffled(self) -> list[StoredDocument]:
        """The documents in a fresh random order."""
        documents = list(self.documents.values())
        self._random.shuffle(documents)
        return documents


def _field(body: Any, *path: str) -> Any:
    """``body[path[0]][path[1]]...``, or None where a level is missing or not an object."""
    value = body
    for key in path:
        if not isinstance(value, dict):
            return None
        value = cast("dict[str, Any]", value).get(key)
    return value


async def _record(request: Request, state: NilragNodeState, route: str) -> Recorded:
    try:
        body: Any = await request.json()
    except ValueError:
        body = None
    authorized = secrets.compare_digest(
        request.headers.get("authorization", ""), f"Bearer {state.token}"
    )
    recorded = Recorded(route, body, authorized, request.headers.get("host", ""))
    state.requests.append(recorded)
    return recorded


async def _hang(request: Request, state: NilragNodeState) -> Response:
    # Waits in steps so that a client that hung up frees the server at once.
    waited = 0.0
    while waited < state.hang_s:
        if await request.is_disconnected():
            state.hung_up += 1
            return Response(status_code=499)
        await asyncio.sleep(0.05)
        waited += 0.05
    return Response(status_code=504)


def _huge(state: NilragNodeState) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"data":['
        while state.huge_bytes_sent < state.huge_bytes:
            state.huge_bytes_sent += len(HUGE_CHUNK)
            yield HUGE_CHUNK
            # Lets the disconnect listener stop the stream once the client hung up.
            await asyncio.sleep(0)
        yield b"]}"

    return StreamingResponse(body(), media_type="application/json")


async def _misbehave(request: Request, state: NilragNodeState, fault: Fault) -> Response | None:
    """The faulty answer, or None when the fault shapes a normal answer (``missing``)."""
    answers: dict[Fault, Callable[[], Response]] = {
        Fault.REDIRECT: lambda: RedirectResponse(state.redirect_to, status_code=307),
        Fault.HUGE: lambda: _huge(state),
        Fault.ERROR: lambda: PlainTextResponse(f"Internal error: {ERROR_MARKER}", status_code=500),
        Fault.MALFORMED: lambda: Response(b'{"data": [{"_id": "', media_type="application/json"),
    }
    if fault is Fault.HANG:
        return await _hang(request, state)
    answer = answers.get(fault)
    return answer() if answer is not None else None


def create_nilrag_node_app(state: NilragNodeState) -> Starlette:
    """The stand-in node app; see the module docstring for its routes and faults."""

    def not_found(error: str) -> Response:
        return JSONResponse({"errors": [error]}, status_code=404)

    async def execute(request: Request) -> Response:
        recorded = await _record(request, state, "execute")
        if not recorded.authorized:
            return PlainTextResponse("Unauthorized", status_code=401)
        fault = state.faults.get("execute")
        if fault is not None and (answer := await _misbehave(request, state, fault)) is not None:
            return answer
        if _field(recorded.body, "id") != state.diff_query_id:
            return not_found("QueryNotFound")
        share = _field(recorded.body, "variables", "query_embedding")
        if not isinstance(share, list) or len(cast("list[Any]", share)) != DIMENSION:
            return JSONResponse({"errors": ["VariableInjectionError"]}, status_code=400)
        query = [int(value) for value in cast("list[Any]", share)]
        documents = state.shuffled()
        if fault is Fault.MISSING:
            documents = documents[1:]
        data = [
            {
                "_id": document.id,
                "difference": [
                    stored - asked for stored, asked in zip(document.embedding, query, strict=True)
                ],
            }
            for document in documents
        ]
        return JSONResponse({"data": data})

    async def read(request: Request) -> Response:
        recorded = await _record(request, state, "read")
        if not recorded.authorized:
            return PlainTextResponse("Unauthorized", status_code=401)
        fault = state.faults.get("read")
        if fault is not None and (answer := await _misbehave(request, state, fault)) is not None:
            return answer
        if _field(recorded.body, "schema") != state.schema_id:
            return not_found("SchemaNotFound")
        wanted = _field(recorded.body, "filter", "_id", "$in")
        ids: set[str] = (
            {str(value) for value in cast("list[Any]", wanted)}
            if isinstance(wanted, list)
            else set[str]()
        )
        documents = [document for document in state.shuffled() if document.id in ids]
        if fault is Fault.MISSING:
            documents = documents[1:]
        data = [{"_id": document.id, "chunk": document.chunk} for document in documents]
        return JSONResponse({"data": data})

    async def trap(request: Request) -> Response:
        await _record(request, state, "trap")
        return JSONResponse({"data": []})

    return Starlette(
        routes=[
            Route(f"{API_ROOT}/queries/execute", execute, methods=["POST"]),
            Route(f"{API_ROOT}/data/read", read, methods=["POST"]),
            Route(f"{API_ROOT}/trap", trap, methods=["GET", "POST"]),
        ]
    )
