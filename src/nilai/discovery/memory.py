"""In-process discovery for the embedded default and tests."""

from __future__ import annotations

import time
import uuid

from nilai.discovery.base import EndpointRecord


class MemoryDiscovery:
    """Discovery held in a dict; leases expire on the monotonic clock."""

    location = "in-process"

    def __init__(self) -> None:
        self._records: dict[str, tuple[EndpointRecord, float]] = {}
        self._generation = uuid.uuid4().hex

    async def register(self, record: EndpointRecord, ttl_s: float) -> None:
        """Add or replace a server's record and (re)start its lease."""
        self._records[record.id] = (record, time.monotonic() + ttl_s)

    async def heartbeat(self, endpoint: str, ttl_s: float) -> bool:
        """Renew a lease; False if it had already expired."""
        entry = self._live(endpoint)
        if entry is None:
            return False
        self._records[endpoint] = (entry, time.monotonic() + ttl_s)
        return True

    async def deregister(self, endpoint: str) -> None:
        """Remove a server now."""
        self._records.pop(endpoint, None)

    async def list(self) -> list[EndpointRecord]:
        """Every server whose lease is alive."""
        return [record for key in list(self._records) if (record := self._live(key)) is not None]

    async def generation(self) -> str:
        """Fixed: what this process holds is lost only with the process."""
        return self._generation

    async def ping(self) -> None:
        """Always reachable."""

    async def aclose(self) -> None:
        """Nothing to release."""

    def _live(self, endpoint: str) -> EndpointRecord | None:
        entry = self._records.get(endpoint)
        if entry is None:
            return None
        record, expires = entry
        if expires <= time.monotonic():
            del self._records[endpoint]
            return None
        return record
