"""``GET /v1/attestation/report``: evidence that binds the signing key to a fresh nonce."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from nilai.attestation.report import (
    MAX_NONCE_BYTES,
    NONCE_PATTERN,
    AttestationReport,
    build_report,
    check_query,
    parse_nonce,
)
from nilai.errors import rate_limit_headers
from nilai.gateway.deps import PrincipalDep, ServicesDep
from nilai.protocol.errors import error_responses

router = APIRouter(tags=["attestation"])

# The nonce is checked by ``parse_nonce`` (422 naming ``nonce``); the schema only documents it.
_NONCE = Query(
    description=f"Hex nonce, 1 to {MAX_NONCE_BYTES} bytes; without it the server picks 32.",
    json_schema_extra={"pattern": NONCE_PATTERN, "minLength": 2, "maxLength": 2 * MAX_NONCE_BYTES},
)
_RESPONSES: dict[int | str, dict[str, Any]] = error_responses(401, 422, 429, 502, 503, 504)


@router.get("/v1/attestation/report", responses=_RESPONSES)
async def attestation_report(
    request: Request,
    response: Response,
    services: ServicesDep,
    principal: PrincipalDep,
    nonce: Annotated[str | None, _NONCE] = None,
) -> AttestationReport:
    """Attest ``SHA-256(public key ‖ nonce)``; without a nonce the server picks 32 bytes.

    Each report asks the attester or the hardware for a fresh quote, so reports are counted
    per account (``NILAI_ATTESTATION_RATE_LIMIT_MINUTE``): 429 with ``Retry-After`` above it.
    """
    check_query(request.query_params.multi_items())
    chosen = parse_nonce(nonce)
    decision = await services.admission.admit_attestation(principal)
    response.headers.update(rate_limit_headers(decision))
    return await build_report(services.attestation, services.signer.public_key_bytes, chosen)
