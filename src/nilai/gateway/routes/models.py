"""The models callers can use."""

from __future__ import annotations

from fastapi import APIRouter

from nilai.gateway.deps import PrincipalDep, ServicesDep
from nilai.protocol.errors import error_responses
from nilai.protocol.models import ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", responses=error_responses(401))
async def list_models(services: ServicesDep, _principal: PrincipalDep) -> ModelList:
    """Every model a live model server announces, in the OpenAI list shape."""
    return ModelList(data=services.snapshot.models())
