"""The development provider: signed JSON documents that say plainly they are simulated.

Each document is a JSON object ``{"format", "kind", "simulated": true, "notice",
"report_data", "verifying_key", "issued_at", "signature"}``; ``kind`` is ``cpu`` or ``gpu`` so
the two can never be swapped unnoticed. The signature is the gateway's (ECDSA-SHA256, DER,
base64) over ``FORMAT``, one newline, then the canonical JSON of the document without
``signature``. The prefix keeps these documents from ever passing as signed answers, which
sign bare canonical JSON (DESIGN §3). A valid document proves only that the key holder issued
it for this ``report_data``: there is no hardware behind it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from typing import Any, Literal

from coincurve import PublicKey

from nilai.attestation.base import Evidence, EvidenceError
from nilai.crypto.canonical import canonical_json
from nilai.crypto.keys import Signer

FORMAT = "nilai-simulated-attestation/1"
NOTICE = "SIMULATED evidence: no hardware guarantee"

EvidenceKind = Literal["cpu", "gpu"]


class SimulatedProvider:
    """Issues signed, clearly marked simulated evidence for development and tests."""

    name = "simulated"
    simulated = True

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    async def report(self, report_data: bytes) -> Evidence:
        """Return a signed CPU document and a signed GPU document over ``report_data``."""
        return Evidence(
            cpu_attestation=self.document("cpu", report_data),
            gpu_attestation=self.document("gpu", report_data),
            details={"format": FORMAT},
        )

    def document(self, kind: EvidenceKind, report_data: bytes) -> str:
        """The signed document of one ``kind``, as canonical JSON text."""
        body: dict[str, Any] = {
            "format": FORMAT,
            "kind": kind,
            "simulated": True,
            "notice": NOTICE,
            "report_data": report_data.hex(),
            "verifying_key": self._signer.public_key_b64,
            "issued_at": int(time.time()),
        }
        body["signature"] = self._signer.sign(signed_message(body))
        return canonical_json(body).decode()


def signed_message(unsigned: dict[str, Any]) -> bytes:
    """The bytes a simulated document's signature covers."""
    # Any: JSON values.
    return FORMAT.encode() + b"\n" + canonical_json(unsigned)


def is_simulated_document(text: str) -> bool:
    """True when ``text`` is a JSON object in the simulated format (signature not checked)."""
    try:
        obj: Any = json.loads(text)  # Any: untrusted JSON, checked below
    except ValueError:
        return False
    if not isinstance(obj, dict):
        return False
    doc: dict[str, Any] = obj  # pyright: ignore[reportUnknownVariableType]
    return doc.get("format") == FORMAT


def verify_document(
    text: str, *, kind: EvidenceKind, public_key: bytes, report_data: bytes
) -> dict[str, Any]:
    """Check one simulated document and return it.

    Args:
        text: The document as found in ``cpu_attestation`` or ``gpu_attestation``.
        kind: Which of the two it must be.
        public_key: The gateway key the client trusts (33 bytes).
        report_data: The ``report_data`` the client computed itself.

    Returns:
        The document, signature included.

    Raises:
        EvidenceError: The document is malformed, of the other kind, about other data, or
            not signed by ``public_key``.
    """
    doc = _load(text)
    if doc.get("format") != FORMAT or doc.get("simulated") is not True:
        raise EvidenceError(f"{kind}_attestation is not a simulated evidence document")
    if doc.get("kind") != kind:
        raise EvidenceError(f"{kind}_attestation holds {doc.get('kind')!r} evidence")
    if doc.get("report_data") != report_data.hex():
        raise EvidenceError(f"{kind}_attestation is about other report_data")
    signature = doc.get("signature")
    if not isinstance(signature, str):
        raise EvidenceError(f"{kind}_attestation has no signature")
    unsigned = {key: value for key, value in doc.items() if key != "signature"}
    if not _signature_holds(signed_message(unsigned), signature, public_key):
        raise EvidenceError(f"{kind}_attestation is not signed by the gateway's key")
    return doc


def _load(text: str) -> dict[str, Any]:
    try:
        obj: Any = json.loads(text)  # Any: untrusted JSON, checked below
    except ValueError:
        raise EvidenceError("simulated evidence is not valid JSON") from None
    if not isinstance(obj, dict):
        raise EvidenceError("simulated evidence is not a JSON object")
    return obj  # pyright: ignore[reportUnknownVariableType]


def _signature_holds(message: bytes, signature_b64: str, public_key: bytes) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key = PublicKey(public_key)
        return bool(
            key.verify(signature, message, hasher=lambda data: hashlib.sha256(data).digest())
        )
    except (binascii.Error, ValueError):
        return False
