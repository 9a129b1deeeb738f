"""The gateway's view of discovery: a cached snapshot, an endpoint picker, and ejection.

Requests never touch the discovery store: a background task refreshes the snapshot. Endpoints
are taken in turn, and one announced afresh is trusted at once. Only real requests and the
snapshot's own background probes decide that a server is out of rotation ("ejected" for
``NILAI_ENDPOINT_EJECT_S``); nothing a client can ask for, ``/readyz`` included, sends a probe:

- A server that cannot be connected to (refused, or the connection timed out) is ejected at
  once: a request that never reached it is failed over to the next server, so ejection only
  saves later requests the wasted attempt.
- A server that answers requests with errors (5xx other than 503, a broken connection) is
  ejected after ``ERRORS_TO_EJECT`` in a row, so one request that makes a server fail (which a
  caller could craft) does not take it out of rotation for everybody, and a broken server is
  still found within a few requests. Any proper answer resets the count.
- Slowness is never a reason: a slow model server is still the one that can answer, and a slow
  answer is the request timeout's business. Nor is a full local connection pool, which says
  nothing about the server.
- In the background, a server ejected as unreachable is probed (``GET /v1/models``) every
  refresh interval and readmitted as soon as it answers; every server is probed every
  ``NILAI_ENDPOINT_PROBE_S``, and one that cannot be connected to is ejected before a request
  has to find out. One round of probes at a time: a slow server never has more than one probe
  from this process outstanding.

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
from nilai.outages import OutageLog, describe_error
from nilai.protocol.models import ModelCard

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
"""How long a background probe waits for ``/v1/models`` (connecting may take as long as a real
request may: the shared client's connect timeout)."""
ERRORS_TO_EJECT = 3
"""Failed requests in a row (5xx, broken connections) that eject a server that still answers."""


@dataclass
class _Health:
    """What requests and probes found out about one registration of a server."""

    ejected_until: float = 0.0
    ejected_at: float = 0.0
    unreachable: bool = False
    """Ejected because it could not be connected to: a probe that reaches it readmits it."""
    errors_in_a_row: int = 0
    """Failed requests since the last proper answer; kept through an ejection, so the first
    request after it that fails again ejects the server again at once."""


@dataclass
class _Entry:
    record: EndpointRecord
    health: _Health = field(default_factory=_Health)

    @property
    def healthy(self) -> bool:
        return self.health.ejected_until <= time.monotonic()

    @property
    def ejected_as_unreachable(self) -> bool:
        return self.health.unreachable and not self.healthy


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
        probe_s: float = 5.0,
    ) -> None:
        self._discovery = discovery
        self._http = http
        self._refresh_s = refresh_s
        self._eject_s = eject_s
        self._probe_s = probe_s
        self._grace_s = grace_s
        self._entries: dict[str, _Entry] = {}
        self._routes: dict[str, _ModelRoute] = {}
        self._generation: str | None = None
        self._carried: dict[str, _Entry] = {}
        """Servers known before the store lost its registrations, not listed again yet."""
        self._carried_until = 0.0
        self._vanished: dict[str, float] = {}
        """Models no server serves any more, and when they stopped being served."""
        self._tasks: list[asyncio.Task[None]] = []
        self._outage = OutageLog(
            logger,
            f"discovery ({discovery.location})",
            "routing with the last servers it listed until it answers",
        )
        self.last_error: str | None = None

    async def start(self) -> None:
        """Load the first snapshot; keep it fresh and the servers probed until ``aclose``."""
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._refresh_loop(), name="discovery-refresh"),
            asyncio.create_task(self._probe_loop(), name="model-server-probes"),
        ]

    async def aclose(self) -> None:
        """Stop refreshing and probing."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    async def _probe_loop(self) -> None:
        """Unreachable servers every refresh interval, every server every ``probe_s``.

        Apart from ``refresh`` so that a slow probe never delays what discovery says; one round
        at a time, so probes never pile up on a slow server, whoever asks for readiness.
        """
        last_round_of_all = time.monotonic()
        while True:
            await asyncio.sleep(self._refresh_s)
            now = time.monotonic()
            all_due = self._probe_s > 0 and now - last_round_of_all >= self._probe_s
            if all_due:
                last_round_of_all = now
            try:
                await self.probe(only_ejected=not all_due)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one round
                logger.warning("model server probes failed: %s", describe_error(exc))

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
            entries[record.id] = _Entry(record, old.health if old and same else _Health())
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

    def announces(self, model: str, feature: str) -> bool:
        """Whether any server of ``model`` lists ``feature`` in its ``supported_features``."""
        route = self._routes.get(model)
        if route is None:
            return False
        return any(_announces(entry.record, model, feature) for entry in route.endpoints)

    def vanished_recently(self, model: str) -> bool:
        """Whether ``model`` was served until less than the grace period ago, and is not now.

        Such a model is expected back (its server is restarting or announcing again), so a
        request for it is worth retrying, unlike one for a model never served here.
        """
        since = self._vanished.get(model)
        return since is not None and time.monotonic() - since < self._grace_s

    def candidates(self, model: str, *, feature: str | None = None) -> list[EndpointRecord]:
        """Healthy servers for ``model``, starting with the next one in turn.

        With ``feature``, only the servers whose announcement of ``model`` lists it in
        ``supported_features`` (a fleet may mix servers that serve the Responses API and
        servers that do not).
        """
        route = self._routes.get(model)
        if route is None:
            return []
        healthy = [
            entry.record
            for entry in route.endpoints
            if entry.healthy and (feature is None or _announces(entry.record, model, feature))
        ]
        if not healthy:
            return []
        start = next(route.turn) % len(healthy)
        return healthy[start:] + healthy[:start]

    def healthy_models(self) -> list[str]:
        """Models with at least one healthy server."""
        return [m for m, r in self._routes.items() if any(e.healthy for e in r.endpoints)]

    def report_failure(self, endpoint: str) -> None:
        """``endpoint`` could not be connected to: stop sending to it for a while.

        A probe that reaches it again readmits it sooner.
        """
        entry = self._entries.get(endpoint)
        if entry is not None:
            self._eject(entry, unreachable=True, why="unreachable")

    def report_error(self, endpoint: str) -> None:
        """``endpoint`` failed a request (5xx, a broken connection); eject it if that is a habit."""
        entry = self._entries.get(endpoint)
        if entry is None:
            return
        entry.health.errors_in_a_row += 1
        if entry.health.errors_in_a_row >= ERRORS_TO_EJECT:
            why = f"{entry.health.errors_in_a_row} failed requests in a row"
            self._eject(entry, unreachable=False, why=why)

    def report_success(self, endpoint: str) -> None:
        """``endpoint`` answered a request properly: trust it again."""
        entry = self._entries.get(endpoint)
        if entry is not None:
            entry.health.errors_in_a_row = 0
            entry.health.ejected_until = 0.0
            entry.health.unreachable = False

    def _eject(self, entry: _Entry, *, unreachable: bool, why: str) -> None:
        health = entry.health
        if entry.healthy:
            logger.warning(
                "model server %s ejected for %.1fs (%s)", entry.record.id, self._eject_s, why
            )
        now = time.monotonic()
        health.ejected_until = now + self._eject_s
        health.ejected_at = now
        health.unreachable = unreachable

    async def probe(self, *, only_ejected: bool = False) -> None:
        """Ask servers for their model list: readmit or eject by reachability alone.

        ``only_ejected`` probes just the servers ejected as unreachable; otherwise every server
        is probed, except those ejected for failing requests (a model list that answers says
        nothing about chat completions, so they sit out their ejection).
        """
        entries = [
            entry
            for entry in self._entries.values()
            if entry.ejected_as_unreachable or (not only_ejected and entry.healthy)
        ]
        await asyncio.gather(*(self._probe_one(entry) for entry in entries))

    async def _probe_one(self, entry: _Entry) -> None:
        started = time.monotonic()
        timeout = httpx.Timeout(PROBE_TIMEOUT_S, connect=self._http.timeout.connect)
        try:
            response = await self._http.get(f"{entry.record.url}/v1/models", timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            self._eject(entry, unreachable=True, why="unreachable")
            return
        except httpx.HTTPError as exc:
            # Slow to list its models, a broken answer, or no free connection here: none of it
            # says the server cannot take requests, and only real requests decide that.
            logger.debug("probe of model server %s: %s", entry.record.id, type(exc).__name__)
            return
        health = entry.health
        if response.is_success and entry.ejected_as_unreachable and started >= health.ejected_at:
            # Started after the failure that ejected it, so this is news, not a straggler.
            health.ejected_until = 0.0
            health.unreachable = False
            logger.info("model server %s reachable again", entry.record.id)


def _announces(record: EndpointRecord, model: str, feature: str) -> bool:
    """Whether ``record`` announces ``feature`` for ``model``."""
    return any(card.id == model and feature in card.supported_features for card in record.models)
