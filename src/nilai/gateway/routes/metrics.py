"""``GET /metrics``: Prometheus exposition, for scrapers on the allowlist only."""

from __future__ import annotations

import ipaddress
from functools import cache

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nilai.errors import Forbidden
from nilai.gateway.deps import ServicesDep
from nilai.protocol.errors import error_responses

router = APIRouter(tags=["observability"])

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@cache
def _networks(allow: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in allow)


def _allowed(host: str | None, allow: tuple[str, ...]) -> bool:
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in _networks(allow))


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        **error_responses(403),
    },
)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus metrics of this process (``NILAI_METRICS_ALLOW`` says who may scrape)."""
    # The connection's peer, unless it is a proxy in NILAI_FORWARDED_ALLOW_IPS: then uvicorn
    # has put the client that proxy named in its X-Forwarded-For here (gateway/server.py).
    host = request.client.host if request.client else None
    if not _allowed(host, tuple(services.settings.metrics_allow)):
        raise Forbidden("Metrics are only served to the addresses in NILAI_METRICS_ALLOW.")
    body = generate_latest(services.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
