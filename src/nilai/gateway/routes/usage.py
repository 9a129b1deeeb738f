"""The caller's own usage."""

from __future__ import annotations

from fastapi import APIRouter

from nilai.billing.prices import amount_json
from nilai.gateway.deps import PrincipalDep, ServicesDep
from nilai.protocol.errors import error_responses
from nilai.protocol.usage import UsageReport
from nilai.store.base import Usage

router = APIRouter(tags=["usage"])


@router.get("/v1/usage", responses=error_responses(401))
async def usage(services: ServicesDep, principal: PrincipalDep) -> UsageReport:
    """Totals from the database plus this process's rows not yet written."""
    sink = services.usage_sink
    total = Usage()
    for _ in range(3):  # a batch landing between the two reads would count twice or not at all
        version = sink.version
        total = await services.store.usage(principal.account_id)
        total += sink.pending(principal.account_id)
        if sink.version == version:
            break
    return UsageReport(
        prompt_tokens=total.prompt_tokens,
        completion_tokens=total.completion_tokens,
        total_tokens=total.total_tokens,
        queries=total.queries,
        cost=amount_json(total.cost_micro),
    )
