"""The models callers can use."""

from __future__ import annotations

from fastapi import APIRouter

from nilai.gateway.deps import PrincipalDep, ServicesDep
from nilai.protocol.errors import error_responses
from nilai.protocol.models import ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", responses=error_responses(401))
async def list_models(services: ServicesDep, _principal: PrincipalDep) -> ModelList:
    """Every model a live model server announces, in the OpenAI list shape.

    ``server_tools`` lists the tools the gateway runs itself for the model: every enabled one
    for a model with tool support, none otherwise (what a model server says there is ignored).
    """
    tools = sorted(services.tools.names) if services.tools is not None else []
    return ModelList(
        data=[
            card.model_copy(update={"server_tools": tools if card.tool_support else []})
            for card in services.snapshot.models()
        ]
    )
