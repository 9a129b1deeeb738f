"""Client-side verification of an attestation report (DESIGN §5), check by named check.

``check_report`` runs the checks in order and stops at the first failure; its result lists
each check that ran, passed or failed, by name. ``verify_report`` does the same and raises
``ReportVerificationError`` (an ``EvidenceError`` naming the failed check) instead of returning
a failure. ``check_quote`` verifies a bare TDX quote (no gateway, no binding).

The checks, in order:

1. ``report_format``: the body is a well-formed report;
2. ``verifying_key``: it names the key the client trusts (pinned, or read from ``/v1/public_key``);
3. ``nonce``: it echoes the nonce the client just sent (not a replay);
4. ``report_data``: ``report_data`` is ``SHA-256(public key ‖ nonce)``, computed by the client;
5. then, by the kind of evidence:

   - simulated: ``simulated_documents``: both documents are signed by that key over that
     ``report_data`` and are of the kind their field names. Nothing about hardware is proven.
   - an Intel TDX quote (``tsm`` with ``tdx_guest``, or an ``http`` attester's base64 quote):
     ``collateral`` (the policy's collateral, else the one the gateway attached, else fetched
     from the policy's PCCS; none at all fails as ``collateral_missing``), ``tdx_quote``
     (``tdx.verify_tdx_quote``: the quote's signature, QE report, PCK chain to Intel's SGX
     Root CA, CRLs, TCB info and QE identity, valid at the policy's time; a failure is named
     by its own check, e.g. ``quote_signature``, ``collateral_expired``), ``binding`` (the
     *verified* REPORTDATA is ``report_data``), ``tcb_status`` (the policy accepts the TCB
     status), ``measurements`` (each pinned MRTD/RTMR matches; a mismatch fails as
     ``measurement:<name>``). Measurements left unpinned are listed in ``unverified``.
   - an SEV-SNP report or an attester's JSON report: ``user_data``: its user-data field holds
     ``report_data``. Its signature chain is not verified here (listed in ``unverified``).
   - anything else (an unknown provider or TSM backend) fails as ``evidence_format``.

GPU evidence is relayed but not verified: it is always listed in ``unverified``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import httpx
from coincurve import PublicKey
from pydantic import ValidationError

from nilai.attestation.base import EvidenceError, report_data
from nilai.attestation.pccs import (
    ATTACHED_COLLATERAL_KEY,
    CollateralFetchError,
    fetch_collateral,
    quote_identity,
)
from nilai.attestation.quotes import (
    TDX_TEE_TYPE,
    QuoteFormatError,
    UserData,
    attester_user_data,
    tsm_user_data,
)
from nilai.attestation.report import AttestationReport
from nilai.attestation.simulated import NOTICE, is_simulated_document, verify_document
from nilai.attestation.tdx import (
    MEASUREMENT_NAMES,
    Measurements,
    QuoteVerificationError,
    TcbPolicy,
    TdxVerification,
    binding_check,
    verify_tdx_quote,
)

HARDWARE_SIGNATURE_NOT_VERIFIED = "hardware signature not verified"
SIMULATED_NOTICE = "simulated, no hardware evidence"
"""What a simulated report proves about hardware, in the words the CLI prints."""
GPU_UNVERIFIED = (
    "gpu_attestation: relayed, not verified (NVIDIA's certificate chain, revocation and "
    "reference measurements need NVIDIA's online services; see SECURITY.md)"
)
_VENDOR_CHAINS = {
    "SEV-SNP report": "AMD VCEK/ASK/ARK chain, TCB version and launch measurement",
    "attester JSON report": "the attester's report is plain JSON, signed by no hardware",
}


@dataclass(frozen=True, slots=True)
class Check:
    """One check that ran: its name, whether it passed, and what it established or why not."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True, slots=True)
class TdxPolicy:
    """What a TDX quote must satisfy, and where its collateral comes from.

    ``accepted_tcb_statuses``: TCB statuses accepted (default only ``UpToDate``).
    ``measurements``: expected MRTD/RTMR0-3 by name (48 bytes of hex each); unpinned ones are
    reported as unverified. ``at``: the verification time (default: now). ``collateral``: the
    collateral JSON to use (e.g. from ``--collateral``); else the gateway's attached collateral
    when ``use_attached_collateral``; else fetched from ``pccs_url`` if set.
    """

    accepted_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    measurements: Mapping[str, str] = field(default_factory=dict[str, str])
    at: datetime | None = None
    collateral: str | None = None
    use_attached_collateral: bool = True
    pccs_url: str | None = None

    def __post_init__(self) -> None:
        # Validated here, so that a bad policy fails when made, not in the middle of a check.
        TcbPolicy(self.accepted_tcb_statuses)
        # Frozen: a normalized copy, so that the caller's dict cannot change the policy later.
        object.__setattr__(self, "measurements", Measurements(self.measurements).expected)
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError("the verification time must be timezone-aware")

    @property
    def tcb_policy(self) -> TcbPolicy:
        """The TCB status policy."""
        return TcbPolicy(self.accepted_tcb_statuses)

    @property
    def pinned(self) -> Measurements:
        """The pinned measurements, normalized."""
        return Measurements(self.measurements)

    def verification_time(self) -> datetime:
        """``at``, or the current time."""
        return self.at if self.at is not None else datetime.now(UTC)


class _Outcome:
    """What both results share: the checks that ran and what stays unverified."""

    checks: tuple[Check, ...]
    unverified: tuple[str, ...]

    @property
    def failed(self) -> Check | None:
        """The check that failed, or None when all that ran passed."""
        return next((check for check in self.checks if not check.passed), None)

    @property
    def ok(self) -> bool:
        """True when no check failed (``unverified`` may still list gaps)."""
        return self.failed is None

    @property
    def proven(self) -> tuple[str, ...]:
        """What the passed checks established, in words."""
        return tuple(check.detail for check in self.checks if check.passed)


@dataclass(frozen=True, slots=True)
class VerifiedReport(_Outcome):
    """The result of checking a report: each check by name, and what it could not establish."""

    report: AttestationReport | None
    """The parsed report (None only when ``report_format`` failed)."""
    checks: tuple[Check, ...]
    unverified: tuple[str, ...]
    """What these checks cannot establish; empty only when the evidence is fully verified."""
    tdx: TdxVerification | None = None
    """The verified TDX quote's TCB status and measurements, when the quote verified."""
    collateral_source: str | None = None
    """Where the TDX collateral came from: ``policy``, ``gateway`` or ``pccs``."""
    pinned: tuple[str, ...] = ()
    """The measurements checked against pinned values (``mrtd``, ``rtmr0``, ...)."""

    @property
    def simulated(self) -> bool:
        """True when the evidence has no hardware behind it."""
        return self.report is not None and self.report.simulated


@dataclass(frozen=True, slots=True)
class QuoteVerification(_Outcome):
    """The result of checking a bare TDX quote (``check_quote``)."""

    checks: tuple[Check, ...]
    unverified: tuple[str, ...]
    tdx: TdxVerification | None = None
    pinned: tuple[str, ...] = ()
    """The measurements checked against pinned values (``mrtd``, ``rtmr0``, ...)."""


class ReportVerificationError(EvidenceError):
    """A check of a report failed; ``check`` names it and ``result`` holds every check run."""

    def __init__(self, result: VerifiedReport | QuoteVerification) -> None:
        failed = result.failed
        if failed is None:
            raise ValueError("ReportVerificationError needs a result with a failed check")
        super().__init__(failed.detail)
        self.check = failed.name
        self.result = result


class _Failed(Exception):
    """Ends the checks: ``name`` failed because of ``detail``."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(detail)
        self.name = name
        self.detail = detail


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


def verify_report(
    body: bytes | str, *, public_key: bytes, nonce: bytes, policy: TdxPolicy | None = None
) -> VerifiedReport:
    """Check a report like ``check_report`` and raise on the first failed check.

    Raises:
        ReportVerificationError: A check failed; ``check`` names it, the message says why.
    """
    result = check_report(body, public_key=public_key, nonce=nonce, policy=policy)
    if not result.ok:
        raise ReportVerificationError(result)
    return result


def check_report(
    body: bytes | str, *, public_key: bytes, nonce: bytes, policy: TdxPolicy | None = None
) -> VerifiedReport:
    """Check a report body against the key the client trusts, the nonce it sent, and a policy.

    Args:
        body: The JSON body of ``GET /v1/attestation/report``.
        public_key: The gateway's 33-byte public key, as the client knows it.
        nonce: The nonce the client sent with this request.
        policy: The TDX policy (default: ``TdxPolicy()``). When collateral must come from
            its ``pccs_url``, it is fetched here, blocking: from async code use
            ``check_report_async``.

    Returns:
        Every check that ran, by name; the first failed one (if any) ended the checks.
    """
    policy = policy or TdxPolicy()
    report = _parse(body)
    fetched: _Fetched | None = None
    if (needed := _collateral_to_fetch(report, policy)) is not None:
        fetched = asyncio.run(_fetch(*needed))
    return _check(body, report, public_key=public_key, nonce=nonce, policy=policy, fetched=fetched)


async def check_report_async(
    body: bytes | str,
    *,
    public_key: bytes,
    nonce: bytes,
    policy: TdxPolicy | None = None,
    http: httpx.AsyncClient | None = None,
) -> VerifiedReport:
    """``check_report`` for async code: a PCCS fetch runs on ``http`` (or a client of its own)."""
    policy = policy or TdxPolicy()
    report = _parse(body)
    fetched: _Fetched | None = None
    if (needed := _collateral_to_fetch(report, policy)) is not None:
        fetched = await _fetch(*needed, http=http)
    return _check(body, report, public_key=public_key, nonce=nonce, policy=policy, fetched=fetched)


def check_quote(quote: bytes, policy: TdxPolicy) -> QuoteVerification:
    """Verify a bare TDX quote: collateral, the quote itself, TCB status and measurements.

    There is no key or nonce, so no binding: REPORTDATA is for the caller to compare (it is in
    ``tdx.report_data``, from the verified report body). Collateral comes
    from ``policy.collateral`` or, failing that, ``policy.pccs_url`` (fetched, blocking).
    """
    run = _Run(source="policy")
    try:
        collateral = policy.collateral
        if collateral is None and policy.pccs_url:
            collateral = _fetched_or_fail(asyncio.run(_fetch(policy.pccs_url, quote)))
            run.source = "pccs"
        _check_tdx(run, quote, collateral, binding=None, policy=policy)
        run.unverified.extend(_unpinned(policy))
    except _Failed as failed:
        run.checks.append(Check(failed.name, False, failed.detail))
    return QuoteVerification(
        tuple(run.checks), tuple(run.unverified), run.tdx, _pinned(policy, run.tdx)
    )


# --- the checks ----------------------------------------------------------------------------


def _parse(body: bytes | str) -> AttestationReport | None:
    try:
        return AttestationReport.model_validate_json(body)
    except ValidationError:
        return None


@dataclass(slots=True)
class _Run:
    """What the checks found so far."""

    checks: list[Check] = field(default_factory=list[Check])
    unverified: list[str] = field(default_factory=list[str])
    tdx: TdxVerification | None = None
    source: str | None = None


def _check(
    body: bytes | str,
    report: AttestationReport | None,
    *,
    public_key: bytes,
    nonce: bytes,
    policy: TdxPolicy,
    fetched: _Fetched | None,
) -> VerifiedReport:
    run = _Run()
    try:
        if report is None:
            _fail("report_format", f"the report is malformed: {_first_problem(body)}")
        else:
            _check_report(run, report, public_key, nonce, policy, fetched)
    except _Failed as failed:
        run.checks.append(Check(failed.name, False, failed.detail))
    return VerifiedReport(
        report,
        tuple(run.checks),
        tuple(run.unverified),
        run.tdx,
        run.source,
        _pinned(policy, run.tdx),
    )


def _pinned(policy: TdxPolicy, tdx: TdxVerification | None) -> tuple[str, ...]:
    if tdx is None:
        return ()
    return tuple(name for name in MEASUREMENT_NAMES if name in policy.pinned.expected)


def _fail(name: str, detail: str) -> NoReturn:
    raise _Failed(name, detail)


def _check_report(  # noqa: PLR0917 - the inputs of one report check, in order
    run: _Run,
    report: AttestationReport,
    public_key: bytes,
    nonce: bytes,
    policy: TdxPolicy,
    fetched: _Fetched | None,
) -> None:
    run.checks.append(Check("report_format", True, "the report is well formed"))
    _check_key(report, public_key, run.checks)
    _check_nonce(report, nonce, run.checks)
    expected = report_data(public_key, nonce)
    if report.report_data.lower() != expected.hex():
        _fail(
            "report_data",
            "report_data is not SHA-256(public key || nonce): the evidence is not bound to "
            "this key and nonce",
        )
    run.checks.append(Check("report_data", True, "report_data is SHA-256(public key || nonce)"))
    if report.simulated:
        run.unverified.extend(_check_simulated(report, public_key, expected, run.checks))
        return
    _refuse_simulated_documents(report)
    quote = _tdx_quote(report)
    if quote is None:
        run.unverified.extend(_check_user_data(report, expected, run.checks))
    else:
        collateral, run.source = _collateral(report, policy, fetched)
        _check_tdx(run, quote, collateral, binding=(public_key, nonce), policy=policy)
        run.unverified.extend(_unpinned(policy))
    if report.gpu_attestation is not None:
        run.unverified.append(GPU_UNVERIFIED)


def _first_problem(body: bytes | str) -> str:
    try:
        AttestationReport.model_validate_json(body)
    except ValidationError as exc:
        first: Any = exc.errors()[0]  # Any: pydantic's error dict
        where = ".".join(str(part) for part in first.get("loc", ())) or "body"
        return f"{where}: {first.get('msg', 'invalid')}"
    return "invalid"


def _check_key(report: AttestationReport, public_key: bytes, checks: list[Check]) -> None:
    try:
        reported = base64.b64decode(report.verifying_key, validate=True)
    except binascii.Error:
        raise _Failed("verifying_key", "verifying_key is not base64") from None
    if reported != public_key:
        raise _Failed(
            "verifying_key",
            f"wrong key: the report names {report.verifying_key}, not the expected "
            f"{base64.b64encode(public_key).decode()}",
        )
    checks.append(Check("verifying_key", True, "the report names the expected key"))


def _check_nonce(report: AttestationReport, nonce: bytes, checks: list[Check]) -> None:
    try:
        echoed = bytes.fromhex(report.nonce)
    except ValueError:
        raise _Failed("nonce", "the report's nonce is not hex") from None
    if echoed != nonce:
        raise _Failed(
            "nonce",
            f"nonce mismatch: sent {nonce.hex()}, the report is for {report.nonce} "
            "(a replayed or stale report)",
        )
    checks.append(Check("nonce", True, "the report is for the nonce just sent"))


def _check_simulated(
    report: AttestationReport, public_key: bytes, expected: bytes, checks: list[Check]
) -> list[str]:
    try:
        verify_document(
            report.cpu_attestation, kind="cpu", public_key=public_key, report_data=expected
        )
        signed = "CPU document"
        if report.gpu_attestation is not None:
            verify_document(
                report.gpu_attestation, kind="gpu", public_key=public_key, report_data=expected
            )
            signed = "CPU and GPU documents"
    except EvidenceError as exc:
        raise _Failed("simulated_documents", str(exc)) from None
    checks.append(
        Check("simulated_documents", True, f"{signed} signed by the gateway's key over report_data")
    )
    return [f"hardware: {SIMULATED_NOTICE} ({NOTICE}; anyone holding the key can issue it)"]


def _refuse_simulated_documents(report: AttestationReport) -> None:
    for name, text in (("cpu", report.cpu_attestation), ("gpu", report.gpu_attestation)):
        if text is not None and is_simulated_document(text):
            raise _Failed(
                "evidence_format",
                f"the report claims hardware evidence but {name}_attestation is simulated",
            )


def _tdx_quote(report: AttestationReport) -> bytes | None:
    """The report's TDX quote, or None when its CPU evidence is of another kind."""
    if report.simulated:
        return None
    if report.provider == "tsm" and report.details.get("tsm_provider") == "tdx_guest":
        try:
            return base64.b64decode(report.cpu_attestation, validate=True)
        except binascii.Error:
            raise _Failed("evidence_format", "cpu_attestation is not a base64 quote") from None
    if report.provider == "http":
        try:
            raw = base64.b64decode(report.cpu_attestation, validate=True)
        except binascii.Error:
            return None
        if len(raw) >= 8 and int.from_bytes(raw[4:8], "little") == TDX_TEE_TYPE:  # noqa: PLR2004
            return raw
    return None


def _check_user_data(report: AttestationReport, expected: bytes, checks: list[Check]) -> list[str]:
    """Find ``report_data`` in non-TDX CPU evidence; list the hardware checks left to vendors."""
    found = _cpu_user_data(report)
    if not found.holds(expected):
        raise _Failed(
            "user_data", f"the {found.source}'s {found.field} field does not hold report_data"
        )
    checks.append(
        Check("user_data", True, f"the {found.source}'s {found.field} field holds report_data")
    )
    return [f"{HARDWARE_SIGNATURE_NOT_VERIFIED}: {found.source} ({_VENDOR_CHAINS[found.source]})"]


def _cpu_user_data(report: AttestationReport) -> UserData:
    try:
        if report.provider == "tsm":
            try:
                quote = base64.b64decode(report.cpu_attestation, validate=True)
            except binascii.Error:
                raise _Failed("evidence_format", "cpu_attestation is not a base64 quote") from None
            return tsm_user_data(quote, report.details.get("tsm_provider", ""))
        if report.provider == "http":
            return attester_user_data(report.cpu_attestation)
    except QuoteFormatError as exc:
        raise _Failed("evidence_format", str(exc)) from None
    raise _Failed(
        "evidence_format",
        f"unknown provider {report.provider!r}: its evidence cannot be checked, so the report "
        "proves nothing",
    )


def _collateral(
    report: AttestationReport, policy: TdxPolicy, fetched: _Fetched | None
) -> tuple[str | None, str]:
    if policy.collateral is not None:
        return policy.collateral, "policy"
    attached = report.details.get(ATTACHED_COLLATERAL_KEY)
    if attached and policy.use_attached_collateral:
        return attached, "gateway"
    if fetched is not None:
        return _fetched_or_fail(fetched), "pccs"
    return None, "none"


def _check_tdx(
    run: _Run,
    quote: bytes,
    collateral: str | None,
    *,
    binding: tuple[bytes, bytes] | None,
    policy: TdxPolicy,
) -> None:
    """Verify the quote, then the binding, TCB status and measurements on the verified body."""
    if collateral is None:
        _fail(
            "collateral_missing",
            "no collateral for the TDX quote: pass --collateral FILE or --pccs-url URL (the "
            "gateway attached none), so the quote cannot be checked to Intel's root",
        )
    where = {"policy": "given", "gateway": "attached by the gateway", "pccs": "fetched"}
    run.checks.append(Check("collateral", True, f"TDX collateral {where[run.source or 'policy']}"))
    at = policy.verification_time()
    try:
        tdx = verify_tdx_quote(quote, collateral, now=at)
    except QuoteVerificationError as exc:
        raise _Failed(exc.check, exc.message) from None
    except ImportError:
        raise _Failed(
            "verifier_missing",
            "dcap-qvl is not installed: install nilai with the attest extra (nilai[attest])",
        ) from None
    # Kept before the checks below, so that their failures still show the measurements.
    run.tdx = tdx
    run.checks.append(
        Check(
            "tdx_quote",
            True,
            "the TDX quote, QE report, PCK chain to Intel's SGX Root CA, CRLs, TCB info and QE "
            f"identity verify at {at.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        )
    )
    try:
        if binding is not None:
            binding_check(tdx, *binding)
            run.checks.append(
                Check("binding", True, "the verified REPORTDATA is SHA-256(public key || nonce)")
            )
        policy.tcb_policy.check(tdx)
        run.checks.append(Check("tcb_status", True, f"TCB status {tdx.tcb_status} is accepted"))
        policy.pinned.check(tdx)
    except QuoteVerificationError as exc:
        raise _Failed(exc.check, exc.message) from None
    pinned = [name.upper() for name in MEASUREMENT_NAMES if name in policy.pinned.expected]
    if pinned:
        run.checks.append(
            Check("measurements", True, f"{', '.join(pinned)} match the pinned values")
        )


def _unpinned(policy: TdxPolicy) -> list[str]:
    missing = [name.upper() for name in MEASUREMENT_NAMES if name not in policy.pinned.expected]
    if not missing:
        return []
    return [
        f"measurements not pinned: {', '.join(missing)} (any software in a genuine TDX VM "
        "would pass; pin them with --expect-measurements)"
    ]


# --- collateral from a PCCS ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fetched:
    """Collateral fetched from the policy's PCCS, or why there is none."""

    collateral: str | None
    problem: str | None = None


def _collateral_to_fetch(
    report: AttestationReport | None, policy: TdxPolicy
) -> tuple[str, bytes] | None:
    """The PCCS and the TDX quote whose collateral must be fetched, or None when not needed."""
    if report is None or policy.pccs_url is None or policy.collateral is not None:
        return None
    if policy.use_attached_collateral and report.details.get(ATTACHED_COLLATERAL_KEY):
        return None
    try:
        quote = _tdx_quote(report)
    except _Failed:
        return None  # the checks will name it
    return None if quote is None else (policy.pccs_url, quote)


async def _fetch(pccs_url: str, quote: bytes, http: httpx.AsyncClient | None = None) -> _Fetched:
    """Collateral for ``quote`` from ``pccs_url``, or why it cannot be had."""
    try:
        identity = quote_identity(quote)
        if http is not None:
            return _Fetched(await fetch_collateral(http, pccs_url, identity))
        async with httpx.AsyncClient() as own:
            return _Fetched(await fetch_collateral(own, pccs_url, identity))
    except (CollateralFetchError, QuoteVerificationError) as exc:
        return _Fetched(None, str(exc))
    except ImportError:
        return _Fetched(None, "dcap-qvl is not installed (the attest extra)")


def _fetched_or_fail(fetched: _Fetched) -> str:
    if fetched.collateral is None:
        raise _Failed("collateral_missing", f"cannot fetch collateral: {fetched.problem}")
    return fetched.collateral
