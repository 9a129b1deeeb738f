"""The services a gateway process shares across requests, built once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from redis.asyncio import Redis

from nilai.attestation.base import AttestationProvider
from nilai.auth.base import Authenticator
from nilai.billing.prices import PriceBook
from nilai.context.nilauth import DelegationIssuer
from nilai.crypto.keys import Signer
from nilai.discovery.base import Discovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.gateway.chat.service import ChatService
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import Metrics
from nilai.gateway.readiness import SharedChecks
from nilai.gateway.responses.service import ResponsesService
from nilai.limits.policy import Admission
from nilai.settings import NilaiSettings
from nilai.store.base import Store
from nilai.tools.server import ServerTools
from nilai.usage.sink import UsageSink


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a request handler may use; nothing here is per-request."""

    settings: NilaiSettings
    started_at: float
    http: httpx.AsyncClient
    redis: Redis | None
    discovery: Discovery
    snapshot: DiscoverySnapshot
    signer: Signer
    authenticator: Authenticator
    store: Store
    usage_sink: UsageSink
    prices: PriceBook
    """Per-model prices (cached from the database) and the default price."""
    chat: ChatService
    responses: ResponsesService
    attestation: AttestationProvider
    admission: Admission
    metrics: Metrics
    drain: Drain
    readiness: SharedChecks
    delegations: DelegationIssuer | None = None
    """Mints ``/v1/delegation`` tokens; None when nilDB is not configured."""
    tools: ServerTools | None = None
    """The tools the gateway runs itself; None when ``NILAI_SERVER_TOOLS`` names none."""
