"""Intel TDX quote verification down to Intel's SGX root CA, with dcap-qvl.

``verify_tdx_quote`` checks a TDX quote against its DCAP collateral (given as the JSON that
dcap-qvl's ``QuoteCollateralV3.from_json`` reads): the quote's signature by the attestation key,
the Quoting Enclave's report signed by the PCK certificate, the PCK chain to Intel's root CA
(compiled into dcap-qvl, never taken from the inputs), the CRLs, the TCB info and QE identity
and their signatures, and the validity window of each at ``now``. It returns the TCB status,
advisory ids and the measurements of the *verified* TD report, as dcap-qvl returns them.

Beyond dcap-qvl, it refuses inputs that carry bytes no check covers, so that a changed bit
anywhere fails: a root certificate in a chain that is not Intel's (dcap-qvl uses its own copy),
a PCK CRL issuer chain that is not the quote's PCK issuer chain (dcap-qvl does not read it),
PEM chains with anything but certificates and line breaks, or in non-canonical base64, a
certification data type or size that does not describe the quote's own bytes, and non-zero bytes
after the quote's signature data.

Then three checks on the result, each raising ``QuoteVerificationError`` with its check name:
``TcbPolicy`` (which TCB statuses are accepted), ``Measurements`` (pinned MRTD and RTMRs) and
``binding_check`` (REPORTDATA is ``SHA-256(public key ‖ nonce)``).

dcap-qvl is the ``attest`` extra, imported only when a quote is verified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from nilai.attestation.base import EvidenceError, report_data
from nilai.attestation.quotes import UserData

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
"""SHA-256 of the DER of Intel's SGX Root CA certificate, the trust anchor dcap-qvl compiles in."""

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)
"""TCB statuses a verified quote can have (dcap-qvl refuses ``Revoked`` itself)."""

MEASUREMENT_NAMES = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
"""The TD measurements that can be pinned: the initial TD image and the four runtime registers."""
MEASUREMENT_SIZE = 48
"""Bytes of each TD measurement register (SHA-384)."""

_TD_REPORT_FIELDS = {
    "mrtd": "mr_td",
    "rtmr0": "rt_mr0",
    "rtmr1": "rt_mr1",
    "rtmr2": "rt_mr2",
    "rtmr3": "rt_mr3",
    "report_data": "report_data",
}
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL
)
_PEM_CHAIN = re.compile(
    rb"(?:-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----(?:\r?\n)*)+"
)
_TDX_HEADER_SIZE = 48
_TDX_V4_BODY_SIZE = 584
_TDX_V5_DESCRIPTOR_SIZE = 6
_ECDSA_SIGNATURE_AND_KEY_SIZE = 64 + 64
_QE_REPORT_CERTIFICATION_DATA = 6
_QE_REPORT_AND_SIGNATURE_SIZE = 384 + 64

# dcap-qvl reports a failure as one ValueError whose text is its error chain (the outer context,
# then "Caused by:" and the cause). The first pattern found in that text names the check; the
# causes (CRL, expiry, revocation) come before the contexts that wrap them.
_CHECK_PATTERNS: tuple[tuple[str, str], ...] = (
    ("CrlExpired", "collateral_expired"),
    ("TCBInfo expired", "collateral_expired"),
    ("QE Identity expired", "collateral_expired"),
    ("issue date is in the future", "collateral_not_yet_valid"),
    ("CertNotValidYet", "certificate_not_yet_valid"),
    ("CertExpired", "certificate_expired"),
    ("CertRevoked", "certificate_revoked"),
    ("Crl", "crl"),
    ("CRL", "crl"),
    ("RevocationStatus", "crl"),
    ("Signature is invalid for tcb_info", "tcb_info_signature"),
    ("Signature is invalid for qe_identity", "qe_identity_signature"),
    ("Signature is invalid for qe_report", "qe_report_signature"),
    ("ISV enclave report signature", "quote_signature"),
    ("signed quote scope", "quote_signature"),
    ("TCB status is invalid", "tcb_status"),
    ("certificate", "certificate_chain"),
    ("Certificate chain", "certificate_chain"),
    ("root ca", "certificate_chain"),
    ("Intel extension", "certificate_chain"),
    ("Failed to parse certs", "certificate_chain"),
    ("Failed to decode quote", "quote_format"),
    ("quote version", "quote_format"),
    ("QE vendor ID", "quote_format"),
    ("TEE type", "quote_format"),
    ("TEE quote must have", "quote_format"),
    ("attestation key type", "quote_format"),
    ("PCK cert format", "quote_format"),
    ("QE report hash mismatch", "qe_report"),
    ("QE auth data", "qe_report"),
    ("Failed to decode QE report", "qe_report"),
    ("QeIdentity", "qe_identity"),
    ("QE Identity", "qe_identity"),
    ("QE MRSIGNER", "qe_identity"),
    ("QE ISVPRODID", "qe_identity"),
    ("QE MISCSELECT", "qe_identity"),
    ("QE ATTRIBUTES", "qe_identity"),
    ("QE ISVSVN", "qe_identity"),
    ("QE report validation", "qe_identity"),
    ("TcbInfo", "tcb_info"),
    ("TCB Info", "tcb_info"),
    ("TCB info", "tcb_info"),
    ("TCB FMSPC", "tcb_info"),
    ("Fmspc mismatch", "tcb_info"),
    ("TCB level", "tcb_info"),
    ("TDX module", "tcb_info"),
    ("tdxModule", "tcb_info"),
    ("Debug mode", "td_attributes"),
    ("TD attributes", "td_attributes"),
    ("SEPT_VE_DISABLE", "td_attributes"),
    ("MR service TD", "td_attributes"),
)


class QuoteVerificationError(EvidenceError):
    """A TDX quote, its collateral or a check of the verified result failed.

    ``check`` names the failed check (``quote_signature``, ``certificate_chain``, ``crl``,
    ``tcb_info``, ``qe_identity``, ``collateral_expired``, ``tcb_status``,
    ``measurement:mrtd``, ``binding``, ...); ``message`` says what failed, in words.
    """

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


@dataclass(frozen=True, slots=True)
class TdxVerification:
    """What a verified TDX quote proves: its TCB status and the TD report it signs.

    Every value comes from the report body dcap-qvl verified. Measurements and ``report_data``
    are lowercase hex.
    """

    tcb_status: str
    """Intel's TCB status of the platform and Quoting Enclave (``UpToDate``, ``OutOfDate``, ...)."""
    advisory_ids: tuple[str, ...]
    """Intel security advisories that apply to this TCB (``INTEL-SA-…``)."""
    mrtd: str
    """MRTD: the measurement of the initial TD image (firmware)."""
    rtmr0: str
    rtmr1: str
    rtmr2: str
    rtmr3: str
    report_data: str
    """REPORTDATA: the 64 bytes the TD chose (nilai's ``report_data``, zero-padded)."""
    report_type: str = "TD10"
    """The TD report layout: ``TD10`` (TDX 1.0) or ``TD15`` (TDX 1.5)."""

    @property
    def measurements(self) -> dict[str, str]:
        """MRTD and RTMR0-3 by name (``mrtd``, ``rtmr0``, ...), in that order."""
        return {name: getattr(self, name) for name in MEASUREMENT_NAMES}


def verify_tdx_quote(quote: bytes, collateral: str | bytes, *, now: datetime) -> TdxVerification:
    """Verify a TDX quote against its collateral at the time ``now``.

    Args:
        quote: The raw TDX quote (version 4 or 5).
        collateral: Its DCAP collateral as JSON, in the form dcap-qvl's
            ``QuoteCollateralV3.to_json`` writes (PCK CRL and its issuer chain, root CA CRL,
            TCB info and QE identity with their signatures and issuer chains).
        now: The verification time (timezone-aware); every certificate, CRL, TCB info and QE
            identity must be valid then.

    Returns:
        The TCB status, advisory ids and the verified TD report's measurements. No TCB policy
        is applied here (beyond dcap-qvl refusing ``Revoked``): use ``TcbPolicy``.

    Raises:
        QuoteVerificationError: A check failed; ``check`` names it.
        ValueError: ``now`` has no timezone.
        ImportError: dcap-qvl is not installed (the ``attest`` extra).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now_secs = int(now.timestamp())
    if now_secs < 0:
        raise ValueError("now must be after 1970")
    import dcap_qvl  # noqa: PLC0415  # pyright: ignore[reportMissingTypeStubs]

    try:
        text = collateral.decode() if isinstance(collateral, bytes) else collateral
        loaded: Any = dcap_qvl.QuoteCollateralV3.from_json(text)  # Any: untyped binding
    except ValueError as exc:  # UnicodeDecodeError too
        raise QuoteVerificationError("collateral_format", f"unreadable collateral: {exc}") from None
    try:
        verified: Any = dcap_qvl.verify(quote, loaded, now_secs)
    except ValueError as exc:
        raise _from_dcap(str(exc)) from None
    _check_uncovered_bytes(quote, dcap_qvl.parse_quote(quote), _json_object(text))
    return _result(cast(str, verified.to_json()))


def _from_dcap(text: str) -> QuoteVerificationError:
    detail = text.removeprefix("Verification failed: ").strip()
    detail = re.sub(r"\s*\n\s*Caused by:\s*", ": ", detail)
    detail = " ".join(detail.split())
    # Its times are seconds since 1970 (``UnixTime(1775215317)``): shown as dates.
    detail = re.sub(r"UnixTime\((\d+)\)", lambda m: _iso(int(m.group(1))), detail)
    for pattern, check in _CHECK_PATTERNS:
        if pattern in detail:
            return QuoteVerificationError(check, detail)
    return QuoteVerificationError("verification", detail)


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_object(text: str) -> dict[str, object]:
    # dcap-qvl has read this text already; a non-object here would be a dcap-qvl change.
    value: object = json.loads(text)
    if not isinstance(value, dict):
        raise QuoteVerificationError("collateral_format", "the collateral is not a JSON object")
    return cast(dict[str, object], value)


def _check_uncovered_bytes(quote: bytes, parsed: Any, collateral: dict[str, object]) -> None:
    """Refuse bytes that dcap-qvl's checks do not cover (``parsed``: its parsed quote)."""
    _check_quote_layout(quote)
    pck_pem = cast(bytes | None, parsed.cert_chain_pem_bytes())
    chains = {"the quote's PCK certificate chain": _certificates(pck_pem or b"", "quote")}
    for name in ("tcb_info_issuer_chain", "qe_identity_issuer_chain", "pck_crl_issuer_chain"):
        chains[name] = _certificates(str(collateral.get(name, "")).encode(), name)
    for name, chain in chains.items():
        if hashlib.sha256(chain[-1]).hexdigest() != INTEL_SGX_ROOT_CA_SHA256:
            raise QuoteVerificationError(
                "certificate_chain", f"{name} does not end with Intel's SGX Root CA certificate"
            )
    # The PCK CRL is signed by the PCK certificate's issuer, which dcap-qvl finds in the quote's
    # chain; the collateral's copy of that issuer chain must be the same certificates.
    if chains["pck_crl_issuer_chain"] != chains["the quote's PCK certificate chain"][1:]:
        raise QuoteVerificationError(
            "certificate_chain",
            "pck_crl_issuer_chain is not the issuer chain of the quote's PCK certificate",
        )


def _certificates(pem: bytes, name: str) -> list[bytes]:
    """The DER certificates of a PEM chain written in the one form Intel's services use."""
    # dcap-qvl's PEM reader skips stray bytes between and inside blocks (and trailing NULs):
    # only certificates, line breaks and the NULs that end the quote's copy are let through.
    if not _PEM_CHAIN.fullmatch(pem.rstrip(b"\0")):
        raise QuoteVerificationError(
            "certificate_chain", f"{name} is not a chain of PEM certificates alone"
        )
    blocks = _pem_blocks(pem)
    try:
        ders = [base64.b64decode(block, validate=True) for block in blocks]
    except binascii.Error:
        raise QuoteVerificationError("certificate_chain", f"{name} is not base64 PEM") from None
    # Base64 whose unused last bits are set decodes to the same certificate: refused too.
    if [base64.b64encode(der) for der in ders] != blocks:
        raise QuoteVerificationError("certificate_chain", f"{name} is not canonical base64")
    return ders


def _pem_blocks(pem: bytes) -> list[bytes]:
    return [re.sub(rb"[\r\n]", b"", block) for block in _PEM_CERTIFICATE.findall(pem)]


def _check_quote_layout(quote: bytes) -> None:
    """Refuse a quote whose lengths and types do not describe exactly its own bytes.

    dcap-qvl reads the signature data field by field: it does not check the outer
    certification data type (6, the QE report's), nor the two sizes that enclose the
    QE report data, nor what follows the signature data. Only zero padding may follow.
    """

    def u16(at: int) -> int:
        return int.from_bytes(quote[at : at + 2], "little")

    def u32(at: int) -> int:
        return int.from_bytes(quote[at : at + 4], "little")

    body_end = _TDX_HEADER_SIZE + _TDX_V4_BODY_SIZE
    if u16(0) == 5:  # noqa: PLR2004 - quote version 5 has a body descriptor
        body_end = _TDX_HEADER_SIZE + _TDX_V5_DESCRIPTOR_SIZE + u32(_TDX_HEADER_SIZE + 2)
    signature_data = body_end + 4
    outer = signature_data + _ECDSA_SIGNATURE_AND_KEY_SIZE
    if u16(outer) != _QE_REPORT_CERTIFICATION_DATA:
        raise QuoteVerificationError(
            "quote_format",
            f"certification data type {u16(outer)}, not {_QE_REPORT_CERTIFICATION_DATA} "
            "(QE report certification data)",
        )
    qe_data = outer + 6
    auth_size_at = qe_data + _QE_REPORT_AND_SIGNATURE_SIZE
    inner = auth_size_at + 2 + u16(auth_size_at)
    inner_end = inner + 6 + u32(inner + 2)
    if qe_data + u32(outer + 2) != inner_end:
        raise QuoteVerificationError(
            "quote_format", "the QE report certification data size does not match its content"
        )
    if signature_data + u32(body_end) != inner_end:
        raise QuoteVerificationError(
            "quote_format", "the signature data length does not match its content"
        )
    if any(quote[inner_end:]):
        raise QuoteVerificationError(
            "quote_format",
            f"the {len(quote) - inner_end} bytes after the signature data are not zero padding",
        )


def _result(text: str) -> TdxVerification:
    """The structured result from dcap-qvl's verified report, as its ``to_json`` writes it."""
    document = cast(dict[str, Any], json.loads(text))  # Any: dcap-qvl's JSON
    report = cast(dict[str, Any], document.get("report") or {})
    if "TD10" in report:
        report_type, body = "TD10", cast(dict[str, Any], report["TD10"])
    elif "TD15" in report:
        td15 = cast(dict[str, Any], report["TD15"])
        report_type, body = "TD15", cast(dict[str, Any], td15.get("base", td15))
    else:
        kinds = ", ".join(report) or "none"
        raise QuoteVerificationError("quote_format", f"not a TDX quote (report: {kinds})")
    values = {name: _hex(body.get(key)) for name, key in _TD_REPORT_FIELDS.items()}
    advisories = cast(list[Any], document.get("advisory_ids") or [])
    return TdxVerification(
        tcb_status=str(document["status"]),
        advisory_ids=tuple(str(advisory) for advisory in advisories),
        report_type=report_type,
        **values,
    )


def _hex(value: Any) -> str:
    """A byte field of dcap-qvl's JSON (hex text, or a list of byte values) as lowercase hex."""
    if isinstance(value, str):
        return bytes.fromhex(value).hex()
    return bytes(cast(list[int], value)).hex()


@dataclass(frozen=True, slots=True)
class TcbPolicy:
    """Which TCB statuses are accepted; only ``UpToDate`` unless more are listed."""

    accepted_statuses: frozenset[str] = frozenset({"UpToDate"})

    def __post_init__(self) -> None:
        unknown = sorted(self.accepted_statuses - set(TCB_STATUSES))
        if unknown:
            raise ValueError(
                f"unknown TCB status {', '.join(unknown)} (known: {', '.join(TCB_STATUSES)})"
            )

    def check(self, result: TdxVerification) -> None:
        """Raise ``QuoteVerificationError(check="tcb_status")`` for a status not accepted."""
        if result.tcb_status in self.accepted_statuses:
            return
        advisories = ", ".join(result.advisory_ids) or "none"
        accepted = ", ".join(sorted(self.accepted_statuses)) or "none"
        raise QuoteVerificationError(
            "tcb_status",
            f"TCB status {result.tcb_status} is not accepted (accepted: {accepted}; "
            f"advisories: {advisories})",
        )


@dataclass(frozen=True, slots=True)
class Measurements:
    """Expected TD measurements by name (``mrtd``, ``rtmr0``..``rtmr3``), hex of 48 bytes.

    Names left out are not checked; hex is compared case-insensitively.
    """

    expected: Mapping[str, str] = field(default_factory=dict[str, str])

    def __post_init__(self) -> None:
        normalized: dict[str, str] = {}
        for name, value in self.expected.items():
            key = name.lower()
            if key not in MEASUREMENT_NAMES:
                raise ValueError(
                    f"unknown measurement {name!r} (known: {', '.join(MEASUREMENT_NAMES)})"
                )
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"expected {key} is not hex") from None
            if len(raw) != MEASUREMENT_SIZE or len(value.strip()) != 2 * MEASUREMENT_SIZE:
                raise ValueError(f"expected {key} is not {MEASUREMENT_SIZE} bytes of hex")
            normalized[key] = raw.hex()
        # Frozen: store the normalized copy so that callers' dicts cannot change it later.
        object.__setattr__(self, "expected", normalized)

    def check(self, result: TdxVerification) -> None:
        """Raise ``QuoteVerificationError(check="measurement:<name>")`` for the first mismatch."""
        actual = result.measurements
        for name in MEASUREMENT_NAMES:
            want = self.expected.get(name)
            if want is not None and actual[name].lower() != want:
                raise QuoteVerificationError(
                    f"measurement:{name}",
                    f"{name.upper()} is {actual[name]}, expected {want}",
                )


def binding_check(result: TdxVerification, public_key: bytes, nonce: bytes) -> None:
    """Check that the verified REPORTDATA is ``SHA-256(public key ‖ nonce)``, zero-padded.

    Raises:
        QuoteVerificationError: ``check="binding"`` when it is not.
    """
    expected = report_data(public_key, nonce)
    field_value = UserData("TDX quote", "REPORTDATA", bytes.fromhex(result.report_data))
    if not field_value.holds(expected):
        raise QuoteVerificationError(
            "binding",
            "the verified REPORTDATA is not SHA-256(public key || nonce): the quote is not "
            "bound to this key and nonce",
        )
