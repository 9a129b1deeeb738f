"""The gateway's view of discovery: a cached snapshot, an endpoint picker, and ejection.

Requests never touch the discovery store: a background task refreshes the snapshot. Endpoints
are taken in turn; one that fails is ejected for a while and probed in the background, and one
announced afresh is trusted again at once.

What vanishes from discovery is remembered for a grace period (``NILAI_DISCOVERY_GRACE_S``):

- When the store lost every registration (Redis restarted empty or was flushed: its generation
  changed), the model servers did not go anywhere; they announce again within moments. The
  servers known before stay in use until each one is listed again, for at most the grace period,
  so clients see no gap. A server that really left meanwhile fails its requests over to the
  others and is ejected, as any failing server is. A server that deregisters (withdrawn on
  purpose) while the store is intact is dropped at the next refresh, as before.
- A model whose last server left is no longer listed or routed, but for the grace period a
  request for it is answered 503 with ``Retry-After`` (``vanished_recently``) rather than 404:
  a server restarting or re-registering brings it back, and 404 would tell clients to give up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from nilai.discovery.base import Discovery, EndpointRecord
from nilai.outages import OutageLog
from nilai.protocol.models import ModelCard

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0


@dataclass
class _Entry:
    record: EndpointRecord
    ejected_until: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.ejected_until <= time.monotonic()


@dataclass
class _ModelRoute:
    card: ModelCard
    endpoints: list[_Entry] = field(default_factory=list[_Entry])
    turn: Iterator[int] = field(default_factory=itertools.count)


class DiscoverySnapshot:
    """Cached models and endpoints, refreshed in the background."""

    def __init__(
        self,
        discovery: Discovery,
        http: httpx.AsyncClient,
        *,
        refresh_s: float,
        eject_s: float,
        grace_s: float = 30.0,
    ) -> None:
        self._discovery = discovery
        self._http = http
        self._refresh_s = refresh_s
        self._eject_s = eject_s
        self._grace_s = grace_s
        self._entries: dict[str, _Entry] = {}
        self._routes: dict[str, _ModelRoute] = {}
        self._generation: str | None = None
        self._carried: dict[str, _Entry] = {}
        """Servers known before the store lost its registrations, not listed again yet."""
        self._carried_until = 0.0
        self._vanished: dict[str, float] = {}
        """Models no server serves any more, and when they stopped being served."""
        self._task: asyncio.Task[None] | None = None
        self._outage = OutageLog(
            logger, "discovery", "routing with the last servers it listed until it answers"
        )
        self.last_error: str | None = None

    async def start(self) -> None:
        """Load the first snapshot and keep it fresh until ``aclose``."""
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="discovery-refresh")

    async def aclose(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()
            await self.probe(only_ejected=True)

    async def refresh(self) -> None:
        """Re-read discovery; keep failure state only for servers not announced afresh."""
        started = time.monotonic()
        try:
            # Read before and after listing: a store that lost its data at any point up to the
            # listing shows a generation other than the one seen last.
            before = await self._discovery.generation()
            records = await self._discovery.list()
            after = await self._discovery.generation()
        except Exception as exc:  # noqa: BLE001 - keep serving the last snapshot
            self.last_error = type(exc).__name__
            self._outage.failed(exc, started=started)
            return
        self._outage.answered(started=started)
        self.last_error = None
        now = time.monotonic()
        if self._generation is not None and (before != self._generation or after != before):
            self._registrations_lost(now)
        self._generation = after
        entries: dict[str, _Entry] = {}
        for record in records:
            old = self._entries.get(record.id)
            same = old is not None and old.record.registered_at == record.registered_at
            entries[record.id] = _Entry(record, old.ejected_until if old and same else 0.0)
        self._carry_over(entries, now)
        self._entries = entries
        routes = self._build_routes()
        self._note_vanished(routes, now)
        self._routes = routes

    def _registrations_lost(self, now: float) -> None:
        self._carried = dict(self._entries)
        self._carried_until = now + self._grace_s
        if self._carried:
            logger.warning(
                "discovery lost every registration (Redis restarted empty or was flushed); "
                "the %d model servers known before stay in use for up to %.0f s while they "
                "announce again",
                len(self._carried),
                self._grace_s,
            )

    def _carry_over(self, entries: dict[str, _Entry], now: float) -> None:
        """Add the servers known before the store lost its data that are not listed again yet."""
        if not self._carried:
            return
        for endpoint in entries:
            # Announced again: from now on discovery alone decides about this server.
            self._carried.pop(endpoint, None)
        if not self._carried:
            logger.info("every model server announced again after discovery lost its data")
        elif now >= self._carried_until:
            logger.warning(
                "%d model servers known before discovery lost its data did not announce again "
                "within %.0f s; no longer used",
                len(self._carried),
                self._grace_s,
            )
            self._carried = {}
        entries.update(self._carried)

    def _note_vanished(self, routes: dict[str, _ModelRoute], now: float) -> None:
        for model in self._routes.keys() - routes.keys():
            self._vanished[model] = now
        for model in routes.keys() & self._vanished.keys():
            del self._vanished[model]
        for model, since in list(self._vanished.items()):
            if now - since >= self._grace_s:
                del self._vanished[model]

    def _build_routes(self) -> dict[str, _ModelRoute]:
        routes: dict[str, _ModelRoute] = {}
        for entry in self._entries.values():
            for card in entry.record.models:
                route = routes.get(card.id)
                if route is None:
                    old = self._routes.get(card.id)
                    turn = old.turn if old else itertools.count()
                    route = routes[card.id] = _ModelRoute(card, turn=turn)
                route.endpoints.append(entry)
        return routes

    def models(self) -> list[ModelCard]:
        """Every model some live server announces."""
        return [route.card for route in self._routes.values()]

    def card(self, model: str) -> ModelCard | None:
        """The description of ``model``, or None if no server announces it."""
        route = self._routes.get(model)
        return route.card if route else None

    def vanished_recently(self, model: str) -> bool:
        """Whether ``model`` was served until less than the grace period ago, and is not now.

        Such a model is expected back (its server is restarting or announcing again), so a
        request for it is worth retrying, unlike one for a model never served here.
        """
        since = self._vanished.get(model)
        return since is not None and time.monotonic() - since < self._grace_s

    def candidates(self, model: str) -> list[EndpointRecord]:
        """Healthy servers for ``model``, starting with the next one in turn."""
        route = self._routes.get(model)
        if route is None:
            return []
        healthy = [entry.record for entry in route.endpoints if entry.healthy]
        if not healthy:
            return []
        start = next(route.turn) % len(healthy)
        return healthy[start:] + healthy[:start]

    def healthy_models(self) -> list[str]:
        """Models with at least one healthy server."""
        return [m for m, r in self._routes.items() if any(e.healthy for e in r.endpoints)]

    def report_failure(self, endpoint: str) -> None:
        """Stop sending to ``endpoint`` for a while."""
        entry = self._entries.get(endpoint)
        if entry is None:
            return
        if entry.healthy:
            logger.warning("model server %s ejected for %.1fs", endpoint, self._eject_s)
        entry.ejected_until = time.monotonic() + self._eject_s

    def report_success(self, endpoint: str) -> None:
        """Trust ``endpoint`` again."""
        entry = self._entries.get(endpoint)
        if entry is not None:
            entry.ejected_until = 0.0

    async def probe(self, *, only_ejected: bool = False) -> None:
        """Ask servers for their model list; eject those that do not answer."""
        entries = [e for e in self._entries.values() if not (only_ejected and e.healthy)]
        await asyncio.gather(*(self._probe_one(entry) for entry in entries))

    async def _probe_one(self, entry: _Entry) -> None:
        try:
            url = f"{entry.record.url}/v1/models"
            response = await self._http.get(url, timeout=PROBE_TIMEOUT_S)
            response.raise_for_status()
        except httpx.HTTPError:
            self.report_failure(entry.record.id)
            return
        self.report_success(entry.record.id)
