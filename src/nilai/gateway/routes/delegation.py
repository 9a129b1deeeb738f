"""``GET /v1/delegation``: a token to store a private prompt in nilDB for this gateway to read."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from nilai.context.nilauth import parse_user_did
from nilai.context.setup import NOT_CONFIGURED
from nilai.errors import ContextUnavailable, ValidationFailed
from nilai.gateway.deps import PrincipalDep, ServicesDep
from nilai.protocol.delegation import PromptDelegation
from nilai.protocol.errors import error_responses

router = APIRouter(tags=["private prompts"])

PARAM = "prompt_delegation_request"
# Checked by ``parse_user_did`` (422 naming the parameter); the schema only documents it.
_DID = Query(
    description="The DID that will store the prompt: did:nil:<66 hex digits>.",
    json_schema_extra={"pattern": "^did:nil:0[23][0-9a-fA-F]{64}$"},
)
_RESPONSES: dict[int | str, dict[str, Any]] = error_responses(401, 422, 503)


@router.get("/v1/delegation", responses=_RESPONSES)
async def delegation(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    prompt_delegation_request: Annotated[str | None, _DID] = None,
) -> PromptDelegation:
    """A NUC, valid for a minute, letting the caller store one prompt document in nilDB.

    The caller stores the document with the token (nilai-py's ``store_prompt_to_nildb`` does),
    granting read access to ``did``; a chat whose NUC names that document then gets the prompt
    as its first system message. 503 when nilDB is not configured or nilauth is down.
    """
    del principal  # authenticated callers only; nothing is counted or stored
    values = request.query_params.getlist(PARAM)
    if prompt_delegation_request is None or len(values) != 1:
        raise ValidationFailed(
            f"Give '{PARAM}' exactly once: the DID that will store the prompt.",
            param=PARAM,
            code="invalid_value",
        )
    user = parse_user_did(prompt_delegation_request, param=PARAM)
    issuer = services.delegations
    if issuer is None:
        raise ContextUnavailable(
            f"Private prompts are not configured on this gateway ({NOT_CONFIGURED}).",
            code="nildb_not_configured",
        )
    return PromptDelegation(token=await issuer.issue(user), did=issuer.did)
