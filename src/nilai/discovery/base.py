"""The discovery interface and what it stores."""

from __future__ import annotations

import hashlib
from typing import Protocol

from pydantic import BaseModel

from nilai.protocol.models import ModelCard


def endpoint_id(url: str) -> str:
    """Stable id of a model server, derived from its base URL."""
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


class EndpointRecord(BaseModel, frozen=True):
    """One model server and the models it serves.

    ``registered_at`` changes whenever the server is announced afresh, which tells the gateway
    to forget any earlier failure of that server.
    """

    url: str
    models: tuple[ModelCard, ...]
    registered_at: float

    @property
    def id(self) -> str:
        """Stable id of this server."""
        return endpoint_id(self.url)


class Discovery(Protocol):
    """Where model servers are registered with a lease that expires unless renewed."""

    location: str
    """Where the registrations are kept, for log lines: a Redis URL (password masked)."""

    async def register(self, record: EndpointRecord, ttl_s: float) -> None:
        """Add or replace a server's record and (re)start its lease."""
        ...

    async def heartbeat(self, endpoint: str, ttl_s: float) -> bool:
        """Renew a lease; False if it had already expired (register again)."""
        ...

    async def deregister(self, endpoint: str) -> None:
        """Remove a server now."""
        ...

    async def list(self) -> list[EndpointRecord]:
        """Every server whose lease is alive."""
        ...

    async def generation(self) -> str:
        """An id of the store's contents, which changes only when they are lost.

        A store that restarted empty or was flushed has a new generation; servers coming and
        going leave it as it is.
        """
        ...

    async def ping(self) -> None:
        """Raise if the backing store cannot be reached."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
