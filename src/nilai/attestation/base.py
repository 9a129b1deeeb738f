"""The attestation seam: providers, the evidence they return, and the key/nonce binding.

A report binds the gateway's signing key to a fresh client nonce through ``report_data``
(DESIGN §5): ``SHA-256(public key bytes ‖ nonce)``. Providers put those 32 bytes into the
hardware quote (or the simulated document), so a client that checks the quote also learns
that the key which signs every answer lives in the attested environment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

REPORT_DATA_SIZE = 32
"""Bytes of ``report_data`` (one SHA-256 digest)."""


def report_data(public_key: bytes, nonce: bytes) -> bytes:
    """Return ``SHA-256(public_key ‖ nonce)``, the value every provider attests to.

    Args:
        public_key: The 33-byte compressed secp256k1 key that signs answers.
        nonce: The client's (or the server's) fresh nonce.

    Returns:
        The 32-byte digest.
    """
    return hashlib.sha256(public_key + nonce).digest()


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a provider proved, CPU and GPU kept apart (upstream once swapped them).

    ``cpu_attestation`` is the CPU TEE evidence (an SEV-SNP report or TDX quote, base64 for
    configfs-tsm; the attester's text for nilCC; a signed JSON document when simulated).
    ``gpu_attestation`` is the GPU evidence (for example an NVIDIA attestation token), or
    None when this environment has no attested GPU. ``details`` holds short provider facts
    (such as which TSM backend produced the quote) that help a verifier pick its tools.
    """

    cpu_attestation: str
    gpu_attestation: str | None = None
    details: Mapping[str, str] = field(default_factory=dict[str, str])


class AttestationProvider(Protocol):
    """Produces evidence over 32 bytes of ``report_data`` chosen by the gateway."""

    @property
    def name(self) -> str:
        """Short provider name shown in reports (``simulated``, ``http``, ``tsm``)."""
        ...

    @property
    def simulated(self) -> bool:
        """True when the evidence carries no hardware guarantee."""
        ...

    async def report(self, report_data: bytes) -> Evidence:
        """Return evidence over ``report_data``.

        Raises ``UpstreamProtocolError`` (502) when the evidence cannot be produced and
        ``UpstreamTimeout`` (504) when it takes too long; messages carry no internal detail.
        """
        ...


class EvidenceError(Exception):
    """Evidence, or a report carrying it, does not verify; the message says why."""
