"""The body of ``GET /v1/attestation/report``, and the nonce rules it follows."""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Iterable

from pydantic import BaseModel, Field

from nilai.attestation.base import AttestationProvider, report_data
from nilai.errors import ValidationFailed

MAX_NONCE_BYTES = 64
SERVER_NONCE_BYTES = 32
NONCE_PATTERN = rf"^(?:[0-9a-fA-F]{{2}}){{1,{MAX_NONCE_BYTES}}}$"
"""The nonce's form, as a JSON-schema pattern; matched whole (no trailing newline)."""
_MAX_SHOWN = 40
_HEX_NONCE = re.compile(NONCE_PATTERN.removeprefix("^").removesuffix("$"))


class AttestationReport(BaseModel):
    """Evidence that the key signing answers lives in the attested environment."""

    verifying_key: str = Field(
        description="Base64 of the 33-byte compressed secp256k1 key, as /v1/public_key."
    )
    nonce: str = Field(description="Hex nonce: the caller's, or 32 random bytes if none sent.")
    report_data: str = Field(
        description="Hex SHA-256(public key bytes || nonce); the value the evidence covers."
    )
    cpu_attestation: str = Field(description="CPU TEE evidence (quote or simulated document).")
    gpu_attestation: str | None = Field(description="GPU evidence, or null when there is none.")
    provider: str = Field(description="Attestation provider: simulated, http or tsm.")
    simulated: bool = Field(description="True when the evidence has no hardware guarantee.")
    details: dict[str, str] = Field(
        default_factory=dict[str, str], description="Provider facts that help pick a verifier."
    )


def check_query(items: Iterable[tuple[str, str]]) -> None:
    """Refuse query parameters other than one ``nonce``: a proof should not be ambiguous.

    Raises:
        ValidationFailed: An unknown parameter (named in ``param``) or a repeated ``nonce``.
    """
    keys = [key for key, _ in items]
    for key in keys:
        if key != "nonce":
            shown = key if len(key) <= _MAX_SHOWN else key[:_MAX_SHOWN] + "..."
            raise ValidationFailed(
                f"Unknown query parameter {shown!r}: only nonce is accepted.",
                param=shown,
                code="unknown_parameter",
            )
    if len(keys) > 1:
        raise ValidationFailed(
            "nonce is given more than once.", param="nonce", code="invalid_value"
        )


def parse_nonce(value: str | None) -> bytes:
    """The caller's hex nonce as bytes, or a fresh server nonce when none was sent.

    Raises:
        ValidationFailed: ``value`` is not 1 to 64 bytes of hex (422, ``param`` "nonce").
    """
    if value is None:
        return secrets.token_bytes(SERVER_NONCE_BYTES)
    if not _HEX_NONCE.fullmatch(value):
        raise ValidationFailed(
            f"nonce must be 1 to {MAX_NONCE_BYTES} bytes written as hex "
            f"(2 to {2 * MAX_NONCE_BYTES} hex digits).",
            param="nonce",
            code="invalid_value",
        )
    return bytes.fromhex(value)


async def build_report(
    provider: AttestationProvider, public_key: bytes, nonce: bytes
) -> AttestationReport:
    """Ask ``provider`` for evidence over ``SHA-256(public_key ‖ nonce)`` and wrap it.

    Args:
        provider: The configured attestation provider.
        public_key: The gateway's 33-byte compressed public key.
        nonce: The nonce to bind (already validated).

    Returns:
        The response body.
    """
    bound = report_data(public_key, nonce)
    evidence = await provider.report(bound)
    return AttestationReport(
        verifying_key=base64.b64encode(public_key).decode(),
        nonce=nonce.hex(),
        report_data=bound.hex(),
        cpu_attestation=evidence.cpu_attestation,
        gpu_attestation=evidence.gpu_attestation,
        provider=provider.name,
        simulated=provider.simulated,
        details=dict(evidence.details),
    )
