"""The nilDB nodes a NilRAG request names: checked addresses, the two calls, bounded answers.

A client names 2 to 5 nilDB nodes by URL (``nilai.protocol.nilrag.NilragNode``); the gateway
calls each of them twice per request (nilrag 0.1.11's protocol):

- ``POST {url}/queries/execute`` with ``{"id": diff_query_id, "variables": {"query_embedding":
  [384 ints]}}``: the node's shares of the differences between every stored document embedding
  and the query share;
- ``POST {url}/data/read`` with ``{"schema": schema_id, "filter": {"_id": {"$in": ids}}}``: the
  node's shares of the chosen chunks.

Both carry ``Authorization: Bearer <token>``, the client's own token for that node.

**The URLs are the client's**, so they are checked as web search checks page URLs
(``nilai.context.addresses.AddressPolicy``): the scheme must be one of ``schemes`` (``https``
only in production; tests add ``http`` for their loopback stand-ins, together with a policy
that allowlists 127.0.0.0/8), and every address of the host public unless allowlisted. The host
is resolved once, in ``check``; both calls then go to that very address (pinned URL, ``Host``
header and TLS SNI set to the name, ``Connection: close``), so a name cannot rebind to an
internal address between the check and the connection. The client passed in must speak
HTTP/1.1 only (httpx's default), where ``Connection: close`` holds.

**Bounded**: a redirect is never followed (it fails the node: its target was never checked),
each call has ``limits.timeout_s`` for connecting, sending and reading the whole answer, and a
body is read as a stream and abandoned at ``limits.max_response_bytes`` (the rest is never
downloaded). Bodies are asked for and accepted uncompressed only, so the cap is on what is
decoded.

**Failures** raise ``NodeError(index, kind)`` (``NodeRefused(index, reason)`` for a URL the
policy refuses, before anything is sent): the node's position in the request and a short kind,
never the node's answer, its URL or the token. Nothing here logs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal

import httpx

from nilai.context.addresses import (
    AddressPolicy,
    Refused,
    Target,
    host_header,
    parse_url,
    pinned_extensions,
    pinned_url,
)
from nilai.protocol.nilrag import NilragNode

MIB = 1024 * 1024

HTTPS_ONLY: Final = frozenset({"https"})
"""The schemes node URLs may use in production."""

type NodeErrorKind = Literal["unreachable", "timeout", "too_large", "redirect", "status", "refused"]

EXECUTE_ROUTE = "queries/execute"
READ_ROUTE = "data/read"


@dataclass(frozen=True, slots=True)
class NodeLimits:
    """What one node may cost a request."""

    timeout_s: float = 10.0
    """One call to one node: connecting, sending and reading the whole answer."""
    max_response_bytes: int = 32 * MIB
    """Body bytes read per answer; a longer answer fails the node (``too_large``)."""
    max_documents: int = 10_000
    """Documents accepted per answer, for whoever parses the bodies (not checked here)."""


class NodeError(Exception):
    """A node failed; ``index`` is its position in the request's ``nodes`` (from 0).

    ``kind`` is one of: ``unreachable`` (no connection, or it broke), ``timeout`` (the call
    took longer than the per-node timeout), ``too_large`` (the answer is over the byte cap),
    ``redirect`` (the node answered 3xx: not followed), ``status`` (another status than 200, or
    a compressed body that was not asked for; ``status_code`` says which status) and
    ``refused`` (``NodeRefused``). The message names only the index and the kind.
    """

    def __init__(self, index: int, kind: NodeErrorKind, *, status_code: int | None = None) -> None:
        super().__init__(f"nilDB node {index}: {kind}")
        self.index = index
        self.kind: NodeErrorKind = kind
        self.status_code = status_code


class NodeRefused(NodeError):
    """A node's URL may not be used; nothing was sent to it.

    ``reason``: ``scheme`` (not an allowed scheme), or the address policy's kind
    (``bad_url``, ``forbidden_address``, ``dns``).
    """

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(index, "refused")
        self.reason = reason
        self.args = (f"nilDB node {index}: refused ({reason})",)


class NilragNodes:
    """Calls the nilDB nodes of NilRAG requests; see the module docstring."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        policy: AddressPolicy,
        limits: NodeLimits | None = None,
        *,
        schemes: frozenset[str] = HTTPS_ONLY,
    ) -> None:
        """Call nodes with ``http`` at the addresses ``policy`` allows.

        Args:
            http: The shared client (HTTP/1.1); its redirect setting is overridden per request
                and its cookies are never sent to nodes.
            policy: Decides each node's address.
            limits: Per-node timeout and answer caps; the defaults if unset.
            schemes: Schemes node URLs may use: ``https`` only (the default) in production;
                tests with plain-http stand-ins on loopback pass ``{"http", "https"}``.
        """
        self._http = http
        self._policy = policy
        self.limits = limits or NodeLimits()
        self._schemes = schemes

    async def check(self, nodes: Sequence[NilragNode]) -> list[Target]:
        """Each node's URL through the scheme rule and the address policy, in request order.

        Names are resolved concurrently, each within the per-node timeout. Nothing is sent.

        Raises:
            NodeRefused: A node's URL may not be used (the lowest such index).
            NodeError: ``timeout``: a name took longer than the per-node timeout to resolve.
        """
        results = await asyncio.gather(
            *(self._check_one(index, node.url) for index, node in enumerate(nodes)),
            return_exceptions=True,
        )
        targets: list[Target] = []
        for result in results:  # in request order: the lowest failing index is raised
            if isinstance(result, BaseException):
                raise result
            targets.append(result)
        return targets

    async def _check_one(self, index: int, url: str) -> Target:
        try:
            parsed = parse_url(url)
            if parsed.scheme not in self._schemes:
                raise NodeRefused(index, "scheme")
            async with asyncio.timeout(self.limits.timeout_s):
                return await self._policy.check(parsed)
        except Refused as refusal:
            raise NodeRefused(index, refusal.kind.value) from None
        except TimeoutError:
            raise NodeError(index, "timeout") from None

    async def execute(
        self, index: int, node: NilragNode, target: Target, query_share: list[int]
    ) -> bytes:
        """The node's ``queries/execute`` answer (raw JSON) for its share of the query.

        Raises:
            NodeError: The node failed (see ``NodeError`` for the kinds).
        """
        body = {"id": node.diff_query_id, "variables": {"query_embedding": query_share}}
        return await self._post(index, node, target, EXECUTE_ROUTE, body)

    async def read(self, index: int, node: NilragNode, target: Target, ids: list[str]) -> bytes:
        """The node's ``data/read`` answer (raw JSON): its shares of the documents ``ids``.

        Raises:
            NodeError: The node failed (see ``NodeError`` for the kinds).
        """
        body = {"schema": node.schema_id, "filter": {"_id": {"$in": ids}}}
        return await self._post(index, node, target, READ_ROUTE, body)

    async def _post(
        self, index: int, node: NilragNode, target: Target, route: str, body: object
    ) -> bytes:
        url = target.url.copy_with(path=f"{target.url.path.rstrip('/')}/{route}")
        request = self._http.build_request(
            "POST",
            pinned_url(target, url),
            content=json.dumps(body, separators=(",", ":")).encode(),
            headers={
                "Host": host_header(target),
                "Connection": "close",
                "Authorization": f"Bearer {node.bearer_token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                # Uncompressed only: the byte cap is then a cap on the decoded body.
                "Accept-Encoding": "identity",
            },
            extensions=pinned_extensions(target),
            timeout=self.limits.timeout_s,
        )
        # A shared client's cookies (from other services) are not the node's business.
        request.headers.pop("cookie", None)
        try:
            async with asyncio.timeout(self.limits.timeout_s):
                response = await self._http.send(request, stream=True, follow_redirects=False)
                try:
                    return await self._body(index, response)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            raise NodeError(index, "timeout") from None
        except httpx.HTTPError:
            # Never chained: httpx's errors carry the request, and so the token.
            raise NodeError(index, "unreachable") from None

    async def _body(self, index: int, response: httpx.Response) -> bytes:
        status = response.status_code
        if HTTPStatus.MULTIPLE_CHOICES <= status < HTTPStatus.BAD_REQUEST:
            raise NodeError(index, "redirect", status_code=status)
        if status != HTTPStatus.OK:
            raise NodeError(index, "status", status_code=status)
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in {"", "identity"}:
            raise NodeError(index, "status", status_code=status)
        cap = self.limits.max_response_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise NodeError(index, "too_large", status_code=status)
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > cap:
                # The rest is never downloaded: closing the response drops the connection.
                raise NodeError(index, "too_large", status_code=status)
        return bytes(body)
