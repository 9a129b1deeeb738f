"""Client-side checks of an attestation report (DESIGN §5).

What a report can prove here, without vendor tooling:

- ``verifying_key`` is the key the client trusts (pinned, or read from ``/v1/public_key``);
- ``nonce`` is the one the client just sent, so the report is not a replay;
- ``report_data`` is ``SHA-256(public key ‖ nonce)``, computed by the client itself;
- simulated evidence: both documents are signed by that key, over that ``report_data``, and
  are of the kind their field names (CPU in ``cpu_attestation``, GPU in ``gpu_attestation``);
- hardware evidence (``tsm`` and ``http``): the quote's own user-data field (SEV-SNP
  ``REPORT_DATA``, TDX ``REPORTDATA``, or an attester JSON report's ``report_data``) holds
  ``report_data``. Evidence whose field cannot be found (an unknown TSM backend, an attester
  report without ``report_data``, an unknown provider) is refused: nothing is skipped silently.

What it does not prove: that a hardware quote is genuine. Its signature chain (AMD VCEK/ASK/ARK,
Intel PCS, NVIDIA's attestation service), TCB and measurements must be checked with the
vendor's tools, which will then show the same ``report_data``. ``VerifiedReport.unverified``
lists what was left unchecked, so that no caller mistakes a bound report for a verified one.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from coincurve import PublicKey
from pydantic import ValidationError

from nilai.attestation.base import EvidenceError, report_data
from nilai.attestation.quotes import (
    QuoteFormatError,
    UserData,
    attester_user_data,
    tsm_user_data,
)
from nilai.attestation.report import AttestationReport
from nilai.attestation.simulated import NOTICE, is_simulated_document, verify_document

HARDWARE_SIGNATURE_NOT_VERIFIED = "hardware signature not verified"
_VENDOR_CHAINS = {
    "SEV-SNP report": "AMD VCEK/ASK/ARK chain, TCB version and launch measurement",
    "TDX quote": "Intel PCK chain, TCB status and measurements (MRTD, RTMRs)",
    "attester JSON report": "the attester's report is plain JSON, signed by no hardware",
}


@dataclass(frozen=True, slots=True)
class VerifiedReport:
    """A report bound to the expected key and nonce, with what else was and was not checked.

    The binding (key, nonce, ``report_data``) always holds when a report is returned; failures
    raise ``EvidenceError`` instead. ``proven`` and ``unverified`` describe the evidence.
    """

    report: AttestationReport
    proven: tuple[str, ...]
    """Checks of the evidence that passed, in words (beyond the binding itself)."""
    unverified: tuple[str, ...]
    """What these checks cannot establish; empty only when the evidence is fully verified."""

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
        return _check_simulated(report, public_key, expected)
    _refuse_simulated_documents(report)
    return _check_hardware(report, expected)


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


def _check_simulated(
    report: AttestationReport, public_key: bytes, expected: bytes
) -> VerifiedReport:
    verify_document(report.cpu_attestation, kind="cpu", public_key=public_key, report_data=expected)
    signed = "CPU document"
    if report.gpu_attestation is not None:
        verify_document(
            report.gpu_attestation, kind="gpu", public_key=public_key, report_data=expected
        )
        signed = "CPU and GPU documents"
    return VerifiedReport(
        report,
        proven=(f"{signed} signed by the gateway's key over report_data",),
        unverified=(f"hardware: {NOTICE} (anyone holding the key can issue it, anywhere)",),
    )


def _refuse_simulated_documents(report: AttestationReport) -> None:
    for name, text in (("cpu", report.cpu_attestation), ("gpu", report.gpu_attestation)):
        if text is not None and is_simulated_document(text):
            raise EvidenceError(
                f"the report claims hardware evidence but {name}_attestation is simulated"
            )


def _check_hardware(report: AttestationReport, expected: bytes) -> VerifiedReport:
    """Find ``report_data`` in the CPU evidence; list the hardware checks left to vendors."""
    found = _cpu_user_data(report)
    if not found.holds(expected):
        raise EvidenceError(f"the {found.source}'s {found.field} field does not hold report_data")
    unverified = [
        f"{HARDWARE_SIGNATURE_NOT_VERIFIED}: {found.source} ({_VENDOR_CHAINS[found.source]})"
    ]
    if report.gpu_attestation is not None:
        unverified.append("gpu_attestation: not checked at all (use NVIDIA's attestation SDK)")
    return VerifiedReport(
        report,
        proven=(f"the {found.source}'s {found.field} field holds report_data",),
        unverified=tuple(unverified),
    )


def _cpu_user_data(report: AttestationReport) -> UserData:
    try:
        if report.provider == "tsm":
            try:
                quote = base64.b64decode(report.cpu_attestation, validate=True)
            except binascii.Error:
                raise EvidenceError("cpu_attestation is not a base64 quote") from None
            return tsm_user_data(quote, report.details.get("tsm_provider", ""))
        if report.provider == "http":
            return attester_user_data(report.cpu_attestation)
    except QuoteFormatError as exc:
        raise EvidenceError(str(exc)) from None
    raise EvidenceError(
        f"unknown provider {report.provider!r}: its evidence cannot be checked, so the report "
        "proves nothing"
    )
