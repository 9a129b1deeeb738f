"""The caller's own usage."""

from __future__ import annotations

from fastapi import APIRouter

from nilai.gateway.deps import PrincipalDep, ServicesDep
from nilai.protocol.usage import UsageReport

router = APIRouter(tags=["usage"])


@router.get("/v1/usage")
async def usage(services: ServicesDep, principal: PrincipalDep) -> UsageReport:
    """Totals from the database plus this process's rows not yet written."""
    stored = await services.store.usage(principal.account_id)
    total = stored + services.usage_sink.pending(principal.account_id)
    return UsageReport(
        prompt_tokens=total.prompt_tokens,
        completion_tokens=total.completion_tokens,
        total_tokens=total.total_tokens,
        queries=total.queries,
    )
