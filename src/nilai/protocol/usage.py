"""``GET /v1/usage`` body."""

from __future__ import annotations

from pydantic import BaseModel


class UsageReport(BaseModel):
    """The caller's totals since its account was created."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    queries: int
    cost: float
    """What the queries cost, in units of the credit service's currency (exact to 0.000001)."""
