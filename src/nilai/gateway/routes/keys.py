"""The public key that verifies every signed answer."""

from __future__ import annotations

from fastapi import APIRouter

from nilai.gateway.deps import ServicesDep

router = APIRouter(tags=["signing"])


@router.get("/v1/public_key")
async def public_key(services: ServicesDep) -> str:
    """Base64 of the 33-byte compressed secp256k1 public key."""
    return services.signer.public_key_b64
