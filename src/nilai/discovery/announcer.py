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
from nilai.protocol.models import ModelCard

logger = logging.getLogger(__name__)

FAILURES_BEFORE_WITHDRAW = 2


@dataclass(frozen=True)
class ModelOverrides:
    """Metadata the model server cannot tell about itself."""

    tool_support: bool | None = None
    multimodal_support: bool | None = None
    max_model_len: int | None = None
    description: str | None = None

    def apply(self, card: ModelCard) -> ModelCard:
        """Return ``card`` with every override that is set."""
        changes = {key: value for key, value in vars(self).items() if value is not None}
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
    ) -> None:
        self._discovery = discovery
        self._http = http
        self.url = url.rstrip("/")
        self._ttl_s = ttl_s
        self._overrides = overrides or ModelOverrides()
        self._record: EndpointRecord | None = None
        self._failures = 0

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

    async def withdraw(self) -> None:
        """Remove the server from discovery."""
        self._record = None
        await self._discovery.deregister(endpoint_id(self.url))
        logger.info("withdrew %s", self.url)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every third of the lease until ``stop`` is set, then withdraw."""
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except Exception as exc:  # noqa: BLE001 - discovery outages must not kill the loop
                    logger.warning("announcing %s failed: %s", self.url, type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._ttl_s / 3)
        finally:
            if self._record is not None:
                with contextlib.suppress(Exception):
                    await self.withdraw()
