"""Client-side checks of an attestation report (DESIGN §5).

What a report can prove here, without vendor tooling:

- ``verifying_key`` is the key the client trusts (pinned, or read from ``/v1/public_key``);
- ``nonce`` is the one the client just sent, so the report is not a replay;
- ``report_data`` is ``SHA-256(public key ‖ nonce)``, computed by the client itself;
- simulated evidence: both documents are signed by that key, over that ``report_data``, and
  are of the kind their field names (CPU in ``cpu_attestation``, GPU in ``gpu_attestation``);
- configfs-tsm evidence: the quote's own user-data field (SEV-SNP ``REPORT_DATA``, TDX
  ``REPORTDATA``) holds ``report_data``.

What it cannot prove: that a hardware quote is genuine. Its signature chain (AMD VCEK/ASK/ARK,
Intel PCS, NVIDIA's attestation service) must be checked with the vendor's tools, which will
then show the same ``report_data``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from coincurve import PublicKey
from pydantic import ValidationError

from nilai.attestation.base import EvidenceError, report_data
from nilai.attestation.report import AttestationReport
from nilai.attestation.simulated import is_simulated_document, verify_document

REPORT_DATA_FIELD_SIZE = 64
SEV_SNP_REPORT_DATA_OFFSET = 0x50
TDX_TEE_TYPE = 0x81
# Quote header (48 bytes), then the TD report body; REPORTDATA sits 520 bytes into the body.
# Version 5 quotes put a 6-byte body descriptor (type, size) before the body.
TDX_REPORT_DATA_OFFSETS = {4: 48 + 520, 5: 48 + 6 + 520}


@dataclass(frozen=True, slots=True)
class VerifiedReport:
    """What a successful check established."""

    report: AttestationReport
    quote_check: str | None
    """How the hardware quote was tied to ``report_data``, when it could be (tsm only)."""

    @property
    def simulated(self) -> bool:
        """True when the evidence has no hardware behind it."""
        return self.report.simulated


def decode_public_key(public_key_b64: str) -> bytes:
    """The 33-byte compressed key from its base64 text.

    Raises:
        ValueError: Not base64, or not a secp256k1 public key.
    """
    try:
        raw = base64.b64decode(public_key_b64.strip(), validate=True)
        PublicKey(raw)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("not a base64 secp256k1 public key") from None
    if len(raw) != 33:  # noqa: PLR2004 - compressed point size
        raise ValueError("not a 33-byte compressed public key")
    return raw


def verify_report(body: bytes | str, *, public_key: bytes, nonce: bytes) -> VerifiedReport:
    """Check a report body against the key the client trusts and the nonce it sent.

    Args:
        body: The JSON body of ``GET /v1/attestation/report``.
        public_key: The gateway's 33-byte public key, as the client knows it.
        nonce: The nonce the client sent with this request.

    Returns:
        The parsed report and what was checked.

    Raises:
        EvidenceError: The report is malformed, names another key or nonce, binds other data,
            or its evidence does not verify; the message says which in plain words.
    """
    try:
        report = AttestationReport.model_validate_json(body)
    except ValidationError as exc:
        raise EvidenceError(f"the report is malformed: {_first_problem(exc)}") from None
    _check_key(report, public_key)
    _check_nonce(report, nonce)
    expected = report_data(public_key, nonce)
    if report.report_data.lower() != expected.hex():
        raise EvidenceError(
            "report_data is not SHA-256(public key || nonce): the evidence is not bound to "
            "this key and nonce"
        )
    if report.simulated:
        _check_simulated(report, public_key, expected)
        return VerifiedReport(report, None)
    _refuse_simulated_documents(report)
    return VerifiedReport(report, _check_quote(report, expected))


def _first_problem(exc: ValidationError) -> str:
    first: Any = exc.errors()[0]  # Any: pydantic's error dict
    where = ".".join(str(part) for part in first.get("loc", ())) or "body"
    return f"{where}: {first.get('msg', 'invalid')}"


def _check_key(report: AttestationReport, public_key: bytes) -> None:
    try:
        reported = base64.b64decode(report.verifying_key, validate=True)
    except binascii.Error:
        raise EvidenceError("verifying_key is not base64") from None
    if reported != public_key:
        raise EvidenceError(
            f"wrong key: the report names {report.verifying_key}, not the expected "
            f"{base64.b64encode(public_key).decode()}"
        )


def _check_nonce(report: AttestationReport, nonce: bytes) -> None:
    try:
        echoed = bytes.fromhex(report.nonce)
    except ValueError:
        raise EvidenceError("the report's nonce is not hex") from None
    if echoed != nonce:
        raise EvidenceError(
            f"nonce mismatch: sent {nonce.hex()}, the report is for {report.nonce} "
            "(a replayed or stale report)"
        )


def _check_simulated(report: AttestationReport, public_key: bytes, expected: bytes) -> None:
    verify_document(report.cpu_attestation, kind="cpu", public_key=public_key, report_data=expected)
    if report.gpu_attestation is not None:
        verify_document(
            report.gpu_attestation, kind="gpu", public_key=public_key, report_data=expected
        )


def _refuse_simulated_documents(report: AttestationReport) -> None:
    for name, text in (("cpu", report.cpu_attestation), ("gpu", report.gpu_attestation)):
        if text is not None and is_simulated_document(text):
            raise EvidenceError(
                f"the report claims hardware evidence but {name}_attestation is simulated"
            )


def _check_quote(report: AttestationReport, expected: bytes) -> str | None:
    """Tie a configfs-tsm quote to ``report_data`` through its user-data field."""
    if report.provider != "tsm":
        return None
    try:
        quote = base64.b64decode(report.cpu_attestation, validate=True)
    except binascii.Error:
        raise EvidenceError("cpu_attestation is not a base64 quote") from None
    backend = report.details.get("tsm_provider", "")
    located = _locate_report_data(quote, backend)
    if located is None:
        return None
    label, offset = located
    field = quote[offset : offset + REPORT_DATA_FIELD_SIZE]
    if field != expected.ljust(REPORT_DATA_FIELD_SIZE, b"\0"):
        raise EvidenceError(f"the {label} quote's user-data field does not hold report_data")
    return f"the {label} quote's user-data field holds report_data"


def _locate_report_data(quote: bytes, backend: str) -> tuple[str, int] | None:
    offset: int | None = None
    label = backend
    if backend.startswith("sev"):
        label, offset = "SEV-SNP", SEV_SNP_REPORT_DATA_OFFSET
    elif backend.startswith("tdx") and len(quote) >= 8:  # noqa: PLR2004 - version + tee type
        version = int.from_bytes(quote[0:2], "little")
        tee_type = int.from_bytes(quote[4:8], "little")
        if tee_type == TDX_TEE_TYPE:
            label, offset = "TDX", TDX_REPORT_DATA_OFFSETS.get(version)
    if offset is None:
        return None
    if len(quote) < offset + REPORT_DATA_FIELD_SIZE:
        raise EvidenceError(f"the {label} quote is too short ({len(quote)} bytes)")
    return label, offset
