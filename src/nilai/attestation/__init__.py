"""Attestation: providers of CPU/GPU evidence bound to the signing key, and its verifier."""

from nilai.attestation.base import AttestationProvider, Evidence, EvidenceError, report_data
from nilai.attestation.factory import PROVIDERS, make_attestation_provider
from nilai.attestation.http import HttpAttester
from nilai.attestation.report import AttestationReport, build_report, parse_nonce
from nilai.attestation.simulated import SimulatedProvider
from nilai.attestation.tsm import TsmProvider
from nilai.attestation.verify import (
    Check,
    QuoteVerification,
    ReportVerificationError,
    TdxPolicy,
    VerifiedReport,
    check_quote,
    check_report,
    check_report_async,
    decode_public_key,
    verify_report,
)

__all__ = [
    "PROVIDERS",
    "AttestationProvider",
    "AttestationReport",
    "Check",
    "Evidence",
    "EvidenceError",
    "HttpAttester",
    "QuoteVerification",
    "ReportVerificationError",
    "SimulatedProvider",
    "TdxPolicy",
    "TsmProvider",
    "VerifiedReport",
    "build_report",
    "check_quote",
    "check_report",
    "check_report_async",
    "decode_public_key",
    "make_attestation_provider",
    "parse_nonce",
    "report_data",
    "verify_report",
]
