r"""The development provider: signed JSON documents that say plainly they are simulated.

Each document is a JSON object ``{"format", "kind", "simulated": true, "notice",
"report_data", "verifying_key", "issued_at", "signature"}``; ``kind`` is ``cpu`` or ``gpu`` so
the two can never be swapped unnoticed. The signature is the gateway's (ECDSA-SHA256, DER,
base64) over the attestation domain tag ``b"nilai-sig/v1 attestation\n"``, then the canonical
JSON of the document without ``signature``. The tag keeps these documents from ever passing as
signed answers, which start with tags of their own (DESIGN §3). A valid document proves only
that the key holder issued it for this ``report_data``: there is no hardware behind it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from nilai.attestation.base import Evidence, EvidenceError
from nilai.crypto.canonical import canonical_json
from nilai.crypto.domains import SignatureDomain
from nilai.crypto.keys import Signer
from nilai.crypto.verify import VerificationError, check_signature
from nilai.protocol.base import json_object

# /2: signed in the attestation domain (/1 signed FORMAT + LF + canonical JSON).
FORMAT = "nilai-simulated-attestation/2"
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
        body["signature"] = self._signer.sign(SignatureDomain.ATTESTATION, canonical_json(body))
        return canonical_json(body).decode()


def is_simulated_document(text: str) -> bool:
    """True when ``text`` is a JSON object in the simulated format (signature not checked)."""
    try:
        doc = json_object(json.loads(text))
    except ValueError:
        return False
    return doc is not None and doc.get("format") == FORMAT


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
    try:
        check_signature(
            SignatureDomain.ATTESTATION, canonical_json(unsigned), signature, public_key
        )
    except (VerificationError, UnicodeEncodeError) as exc:
        raise EvidenceError(
            f"{kind}_attestation is not signed by the gateway's key: {exc}"
        ) from None
    return doc


def _load(text: str) -> dict[str, Any]:
    try:
        obj: Any = json.loads(text)  # Any: untrusted JSON, checked below
    except ValueError:
        raise EvidenceError("simulated evidence is not valid JSON") from None
    if not isinstance(obj, dict):
        raise EvidenceError("simulated evidence is not a JSON object")
    return obj  # pyright: ignore[reportUnknownVariableType]
