"""``GET /v1/attestation/report``: evidence that binds the signing key to a fresh nonce."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from nilai.attestation.report import (
    MAX_NONCE_BYTES,
    NONCE_PATTERN,
    AttestationReport,
    build_report,
    check_query,
    parse_nonce,
)
from nilai.gateway.deps import PrincipalDep, ServicesDep
from nilai.protocol.errors import error_responses

router = APIRouter(tags=["attestation"])

# The nonce is checked by ``parse_nonce`` (422 naming ``nonce``); the schema only documents it.
_NONCE = Query(
    description=f"Hex nonce, 1 to {MAX_NONCE_BYTES} bytes; without it the server picks 32.",
    json_schema_extra={"pattern": NONCE_PATTERN, "minLength": 2, "maxLength": 2 * MAX_NONCE_BYTES},
)
_RESPONSES: dict[int | str, dict[str, Any]] = error_responses(401, 422, 502, 504)


@router.get("/v1/attestation/report", responses=_RESPONSES)
async def attestation_report(
    request: Request,
    services: ServicesDep,
    _principal: PrincipalDep,
    nonce: Annotated[str | None, _NONCE] = None,
) -> AttestationReport:
    """Attest ``SHA-256(public key ‖ nonce)``; without a nonce the server picks 32 bytes."""
    check_query(request.query_params.multi_items())
    chosen = parse_nonce(nonce)
    return await build_report(services.attestation, services.signer.public_key_bytes, chosen)
