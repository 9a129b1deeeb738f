"""Health and readiness bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Health(BaseModel):
    """``GET /v1/health``."""

    status: Literal["ok"] = "ok"
    uptime: str


class Liveness(BaseModel):
    """``GET /healthz``: the process answers."""

    status: Literal["healthy"] = "healthy"
    uptime: str


class Readiness(BaseModel):
    """``GET /readyz``: whether each dependency answered."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
