"""Liveness, health and readiness."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from nilai.gateway.deps import ServicesDep
from nilai.gateway.services import Services
from nilai.protocol.health import Health, Liveness, Readiness
from nilai.tools.executor import SandboxKind

router = APIRouter(tags=["health"])


def _uptime(services: Services) -> str:
    return f"{time.monotonic() - services.started_at:.2f}s"


@router.get("/v1/health")
async def health(services: ServicesDep) -> Health:
    """The gateway is up."""
    return Health(uptime=_uptime(services))


@router.get("/healthz")
@router.get("/v1/healthz")
async def healthz(services: ServicesDep) -> Liveness:
    """Liveness: answers from memory, touches nothing else."""
    return Liveness(uptime=_uptime(services))


@router.get("/readyz", response_model=Readiness)
@router.get("/v1/readyz", response_model=Readiness)
async def readyz(services: ServicesDep) -> JSONResponse:
    """Readiness: shared state reachable and at least one model server in rotation.

    Anyone may call it, so it costs the same however often it is called: the database and
    Redis pings are shared and reused for a second (``SharedChecks``), and the model servers
    are read from the routing snapshot, never probed from here. Probing is the snapshot's own
    background work, at its own cadence; a probe run for a caller would let anonymous traffic
    multiply requests to the model servers (and, when ejection followed a slow probe, take
    working servers out of rotation).
    """
    checks = await services.readiness.results()
    checks["usage_log"] = _usage_log(services)
    healthy = services.snapshot.healthy_models()
    checks["models"] = f"ok ({len(healthy)} served)" if healthy else "no reachable model server"
    if services.tools is not None:
        checks["sandbox"] = _sandbox(services.tools.sandbox)
    if services.drain.draining:
        # Out of the load balancer's rotation while open requests finish.
        checks["shutdown"] = "draining"
    ready = all(value.startswith("ok") for value in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _sandbox(kind: SandboxKind) -> str:
    """How the code of ``execute_python`` is isolated; the weaker sandbox says so plainly."""
    if kind == "rlimit":
        return (
            "ok (rlimit: resource limits and an empty environment only; no network, file "
            "system or process isolation: install bubblewrap)"
        )
    return f"ok ({kind})"


def _usage_log(services: Services) -> str:
    """The query-log writer, from memory: degraded when rows wait and none has been written.

    A backlog alone is fine (the database is slow or down, and its own check says so); a
    writer that gets nothing out for ``NILAI_USAGE_STALL_S`` means requests served here go
    unaccounted, and the queue will drop rows once full, so the replica leaves rotation.
    """
    sink = services.usage_sink
    counts = f"{sink.depth} queued, {sink.dropped} dropped"
    stalled_s = sink.stalled_s
    if stalled_s > services.settings.usage_stall_s:
        return f"degraded (nothing written for {stalled_s:.0f}s; {counts})"
    return f"ok ({counts})"
