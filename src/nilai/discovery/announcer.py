"""Keep a model server announced in discovery while it answers, and withdraw it when it stops.

Used by ``nilai announce`` for any OpenAI-compatible server, by the gateway for statically
configured upstreams, and by the workers for themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import cast

import httpx

from nilai.discovery.base import Discovery, EndpointRecord, endpoint_id
from nilai.outages import OutageLog
from nilai.protocol.models import ModelCard

logger = logging.getLogger(__name__)

FAILURES_BEFORE_WITHDRAW = 2
DISCOVERY_RETRY_S = 0.5
"""Seconds between attempts while discovery (Redis) does not answer.

Short, so a server is announced again as soon as Redis is back: a Redis that restarted empty
has lost every registration, and gateways route to a model only while it is registered.
"""


@dataclass(frozen=True)
class ModelOverrides:
    """Metadata the model server cannot tell about itself."""

    tool_support: bool | None = None
    multimodal_support: bool | None = None
    max_model_len: int | None = None
    description: str | None = None
    features: tuple[str, ...] = ()
    """Added to the card's ``supported_features`` (e.g. ``responses``: OpenAI-compatible
    servers do not list what they serve)."""

    def apply(self, card: ModelCard) -> ModelCard:
        """Return ``card`` with every override that is set."""
        changes: dict[str, object] = {
            key: value
            for key, value in vars(self).items()
            if value is not None and key != "features"
        }
        if self.features:
            known = card.supported_features
            changes["supported_features"] = [*known, *(f for f in self.features if f not in known)]
        return card.model_copy(update=changes)


async def fetch_models(
    http: httpx.AsyncClient, url: str, overrides: ModelOverrides, timeout_s: float = 2.0
) -> tuple[ModelCard, ...]:
    """Read an OpenAI-compatible server's ``/v1/models`` into model cards."""
    response = await http.get(f"{url}/v1/models", timeout=timeout_s)
    response.raise_for_status()
    data: object = response.json()
    entries = cast(dict[str, object], data).get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{url}/v1/models lists no models")
    return tuple(overrides.apply(_card(entry)) for entry in cast(list[object], entries))


def _card(entry: object) -> ModelCard:
    if not isinstance(entry, dict):
        raise ValueError("a model entry is not an object")  # noqa: TRY004 - bad data, not a bug
    items = cast(dict[str, object], entry)
    model_id = items.get("id")
    if not isinstance(model_id, str):
        raise ValueError("a model entry has no id")  # noqa: TRY004 - bad data, not a bug
    known = ModelCard.model_fields
    fields = {k: v for k, v in items.items() if k in known and v is not None}
    fields.setdefault("name", model_id)
    return ModelCard.model_validate(fields)


SERVER_POLL_S = 0.1
"""Seconds between checks while a server that is starting in this process is not yet answering."""


async def until_answering(
    http: httpx.AsyncClient, url: str, stop: asyncio.Event, interval_s: float = SERVER_POLL_S
) -> bool:
    """Wait until ``url``'s ``/v1/models`` answers (True) or ``stop`` is set (False).

    For a server that announces itself: its start-up code runs before it listens, so a first
    check then would fail, warn, and leave it unannounced for a whole lease period. Failures
    here are expected, so they are not logged.
    """
    while not stop.is_set():
        try:
            await fetch_models(http, url, ModelOverrides(), timeout_s=1.0)
        except (httpx.HTTPError, ValueError):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
        else:
            return True
    return False


class Announcer:
    """Registers one server, renews its lease, withdraws it on failure or stop."""

    def __init__(
        self,
        discovery: Discovery,
        http: httpx.AsyncClient,
        url: str,
        *,
        ttl_s: float,
        overrides: ModelOverrides | None = None,
        retry_s: float = DISCOVERY_RETRY_S,
        withdraw_on_stop: bool = True,
    ) -> None:
        self._discovery = discovery
        self._withdraw_on_stop = withdraw_on_stop
        self._http = http
        self.url = url.rstrip("/")
        self._ttl_s = ttl_s
        self._retry_s = min(retry_s, ttl_s / 3)
        self._overrides = overrides or ModelOverrides()
        self._record: EndpointRecord | None = None
        self._failures = 0
        self._outage = OutageLog(
            logger,
            f"discovery ({discovery.location}) for {self.url}",
            f"trying again every {self._retry_s:g} s",
        )

    @property
    def registered(self) -> bool:
        """Whether the server is announced right now."""
        return self._record is not None

    async def tick(self) -> None:
        """Check the server once and update discovery to match."""
        try:
            models = await fetch_models(self._http, self.url, self._overrides)
        except (httpx.HTTPError, ValueError) as exc:
            self._failures += 1
            logger.warning("model server %s not answering: %s", self.url, type(exc).__name__)
            if self._record is not None and self._failures >= FAILURES_BEFORE_WITHDRAW:
                await self.withdraw()
            return
        self._failures = 0
        record = self._record
        unchanged = record is not None and record.models == models
        if unchanged and await self._discovery.heartbeat(endpoint_id(self.url), self._ttl_s):
            return
        registered_at = record.registered_at if record else time.time()
        self._record = EndpointRecord(url=self.url, models=models, registered_at=registered_at)
        await self._discovery.register(self._record, self._ttl_s)
        if record is None:
            logger.info("announced %s serving %s", self.url, ", ".join(m.id for m in models))
        elif unchanged:
            logger.info("announced %s again: its registration had expired or was lost", self.url)

    async def withdraw(self) -> None:
        """Remove the server from discovery."""
        self._record = None
        await self._discovery.deregister(endpoint_id(self.url))
        logger.info("withdrew %s", self.url)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every third of the lease until ``stop`` is set, then withdraw.

        While discovery fails, tick every ``retry_s`` instead, so the first tick after it
        answers again (empty, if Redis restarted) registers the server again at once. Without
        ``withdraw_on_stop`` the registration is left to its lease: one that others renew too
        (a gateway replica's ``NILAI_UPSTREAM_URLS``, listed by every replica) is not theirs
        to lose when this one stops.
        """
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except Exception as exc:  # noqa: BLE001 - discovery outages must not kill the loop
                    self._outage.failed(exc)
                    delay = self._retry_s
                else:
                    self._outage.answered()
                    delay = self._ttl_s / 3
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
        finally:
            if self._record is not None and self._withdraw_on_stop:
                with contextlib.suppress(Exception):
                    await self.withdraw()
