"""TDX quote verification with dcap-qvl: the real sample quote, changed bits, expiry, policy."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from nilai.attestation.base import EvidenceError, report_data
from nilai.attestation.tdx import (
    Measurements,
    QuoteVerificationError,
    TcbPolicy,
    TdxVerification,
    _from_dcap,  # pyright: ignore[reportPrivateUsage]
    binding_check,
    verify_tdx_quote,
)
from nilai.crypto.keys import Signer
from tests.unit.attestation.tdx_sample import (
    COLLATERAL,
    INSIDE_VALIDITY,
    MRTD,
    QUOTE,
    REPORT_DATA,
    RTMR0,
    RTMR1,
    RTMR2,
    RTMR3,
)

NONCE = bytes(range(32))


# Offsets in the sample (a version 4 quote): 48-byte header, 584-byte TD report body, then the
# signature data: its length (4), the ECDSA signature (64) and attestation key (64), the
# certification data header (type 6, size), the QE report (384), its signature (64), the QE
# authentication data (2 + 32), the PCK chain's header (type 5, size) and PEM, zero padding.
BODY = 48
SIGNATURE_DATA = 632
PEM = 1258


def verify(quote: bytes = QUOTE, collateral: str = COLLATERAL) -> TdxVerification:
    return verify_tdx_quote(quote, collateral, now=INSIDE_VALIDITY)


def failed_check(quote: bytes = QUOTE, collateral: str = COLLATERAL) -> str:
    with pytest.raises(QuoteVerificationError) as caught:
        verify(quote, collateral)
    return caught.value.check


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 1 << bit
    return bytes(changed)


def result(**changes: object) -> TdxVerification:
    sample = TdxVerification(
        tcb_status="UpToDate",
        advisory_ids=(),
        mrtd=MRTD,
        rtmr0=RTMR0,
        rtmr1=RTMR1,
        rtmr2=RTMR2,
        rtmr3=RTMR3,
        report_data=REPORT_DATA,
    )
    return dataclasses.replace(sample, **changes)  # pyright: ignore[reportArgumentType]


def test_the_sample_verifies_as_up_to_date_with_its_measurements():
    verified = verify()
    assert verified.tcb_status == "UpToDate"
    assert verified.advisory_ids == ()
    assert verified.report_type == "TD10"
    assert verified.measurements == {
        "mrtd": MRTD,
        "rtmr0": RTMR0,
        "rtmr1": RTMR1,
        "rtmr2": RTMR2,
        "rtmr3": RTMR3,
    }
    assert verified.report_data == REPORT_DATA
    # The verified REPORTDATA is the one the raw quote carries at byte 568.
    assert bytes.fromhex(verified.report_data) == QUOTE[568 : 568 + 64]


def test_collateral_may_be_given_as_bytes():
    assert verify_tdx_quote(QUOTE, COLLATERAL.encode(), now=INSIDE_VALIDITY).mrtd == MRTD


@pytest.mark.parametrize(
    ("offset", "check"),
    [
        pytest.param(12, "quote_format", id="header: QE vendor id"),
        pytest.param(30, "quote_signature", id="header: user data"),
        pytest.param(BODY + 136, "quote_signature", id="body: MRTD"),
        pytest.param(BODY + 376, "quote_signature", id="body: RTMR2"),
        pytest.param(568, "quote_signature", id="body: REPORTDATA"),
        pytest.param(SIGNATURE_DATA, "quote_format", id="signature data length"),
        pytest.param(SIGNATURE_DATA + 10, "quote_signature", id="quote signature"),
        pytest.param(SIGNATURE_DATA + 80, "qe_report", id="attestation key"),
        pytest.param(SIGNATURE_DATA + 132, "quote_format", id="certification data type"),
        pytest.param(800, "qe_report_signature", id="QE report"),
        pytest.param(1160, "qe_report_signature", id="QE report signature"),
        pytest.param(1225, "qe_report", id="QE authentication data"),
        pytest.param(PEM + 100, "certificate_chain", id="certification data: PCK certificate"),
        pytest.param(PEM + 26, "certificate_chain", id="certification data: PEM line break"),
        pytest.param(
            QUOTE.index(b"\0", PEM), "certificate_chain", id="certification data: final NUL"
        ),
        pytest.param(len(QUOTE) - 10, "quote_format", id="padding"),
    ],
)
def test_a_changed_bit_in_the_quote_fails_with_the_check(offset: int, check: str):
    assert failed_check(quote=flip(QUOTE, offset)) == check


def with_field(name: str, value: str) -> str:
    collateral = json.loads(COLLATERAL)
    collateral[name] = value
    return json.dumps(collateral)


def flip_hex(text: str, offset: int) -> str:
    return flip(bytes.fromhex(text), offset).hex()


def flip_text(text: str, offset: int, bit: int = 0) -> str:
    return flip(text.encode(), offset, bit).decode()


SAMPLE_COLLATERAL = json.loads(COLLATERAL)
TCB_INFO = SAMPLE_COLLATERAL["tcb_info"]
QE_IDENTITY = SAMPLE_COLLATERAL["qe_identity"]


@pytest.mark.parametrize(
    ("name", "change", "check"),
    [
        # "fmspc":"B0C06F000000" becomes "C0C06F000000": still valid JSON, no longer signed.
        pytest.param(
            "tcb_info",
            flip_text(TCB_INFO, TCB_INFO.index("B0C06F")),
            "tcb_info_signature",
            id="TCB info: FMSPC",
        ),
        pytest.param(
            "tcb_info",
            flip_text(TCB_INFO, TCB_INFO.index("issueDate") + 14),
            "collateral_not_yet_valid",
            id="TCB info: issue date",
        ),
        pytest.param(
            "tcb_info", flip_text(TCB_INFO, len(TCB_INFO) // 2), "tcb_info", id="TCB info: JSON"
        ),
        pytest.param(
            "tcb_info_signature",
            flip_hex(SAMPLE_COLLATERAL["tcb_info_signature"], 5),
            "tcb_info_signature",
            id="TCB info signature",
        ),
        pytest.param(
            "qe_identity",
            flip_text(QE_IDENTITY, QE_IDENTITY.index("DC9E2A7C")),
            "qe_identity_signature",
            id="QE identity: MRSIGNER",
        ),
        pytest.param(
            "qe_identity",
            flip_text(QE_IDENTITY, len(QE_IDENTITY) // 2),
            "qe_identity",
            id="QE identity: JSON",
        ),
        pytest.param(
            "qe_identity_signature",
            flip_hex(SAMPLE_COLLATERAL["qe_identity_signature"], 40),
            "qe_identity_signature",
            id="QE identity signature",
        ),
        pytest.param(
            "root_ca_crl",
            flip_hex(SAMPLE_COLLATERAL["root_ca_crl"], 40),
            "crl",
            id="root CA CRL",
        ),
        pytest.param(
            "pck_crl",
            flip_hex(SAMPLE_COLLATERAL["pck_crl"], 1331),
            "crl",
            id="PCK CRL: its revocation list",
        ),
        pytest.param(
            "pck_crl",
            flip_hex(SAMPLE_COLLATERAL["pck_crl"], 2658),
            "crl",
            id="PCK CRL: its signature",
        ),
    ],
)
def test_a_changed_bit_in_the_collateral_fails_with_the_check(name: str, change: str, check: str):
    assert change != SAMPLE_COLLATERAL[name]
    assert failed_check(collateral=with_field(name, change)) == check


def flip_certificate(pem: str, index: int) -> str:
    """Flip one bit in the middle of the DER of the ``index``-th certificate of a PEM chain."""
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----", pem, re.S)
    der = base64.b64decode(blocks[index])
    text = base64.b64encode(flip(der, len(der) // 2)).decode()
    lines = "".join(f"{text[at : at + 64]}\n" for at in range(0, len(text), 64))
    assert len(lines) == len(blocks[index])
    return pem.replace(blocks[index], lines, 1)


QUOTE_PEM = QUOTE[PEM : QUOTE.index(b"\0", PEM)].decode()


@pytest.mark.parametrize(
    ("where", "index"),
    [
        pytest.param("quote", 0, id="quote: PCK certificate"),
        pytest.param("quote", 1, id="quote: PCK platform CA"),
        pytest.param("quote", 2, id="quote: root CA copy"),
        pytest.param("tcb_info_issuer_chain", 0, id="TCB signing certificate"),
        pytest.param("tcb_info_issuer_chain", 1, id="TCB info chain: root CA copy"),
        pytest.param("qe_identity_issuer_chain", 0, id="QE identity signing certificate"),
        pytest.param("pck_crl_issuer_chain", 0, id="PCK CRL issuer"),
        pytest.param("pck_crl_issuer_chain", 1, id="PCK CRL chain: root CA copy"),
    ],
)
def test_a_changed_bit_in_a_certificate_fails(where: str, index: int):
    if where == "quote":
        changed = QUOTE.replace(QUOTE_PEM.encode(), flip_certificate(QUOTE_PEM, index).encode())
        assert len(changed) == len(QUOTE)
        assert failed_check(quote=changed) == "certificate_chain"
    else:
        pem = flip_certificate(SAMPLE_COLLATERAL[where], index)
        assert failed_check(collateral=with_field(where, pem)) == "certificate_chain"


def test_a_certificate_in_non_canonical_base64_fails():
    # The root copy's last base64 digit before "=" carries two unused bits: the same DER.
    pem = SAMPLE_COLLATERAL["pck_crl_issuer_chain"]
    last = pem.rindex("=\n-----END")
    changed = flip_text(pem, last - 1, bit=1)
    assert base64.b64decode(changed[last - 3 : last + 1]) == base64.b64decode(
        pem[last - 3 : last + 1]
    )
    assert failed_check(collateral=with_field("pck_crl_issuer_chain", changed)) == (
        "certificate_chain"
    )


def test_the_quote_fails_as_expired_today():
    with pytest.raises(QuoteVerificationError) as caught:
        verify_tdx_quote(QUOTE, COLLATERAL, now=datetime.now(UTC))
    assert caught.value.check == "collateral_expired"


def test_the_quote_fails_as_expired_after_the_tcb_info_next_update():
    with pytest.raises(QuoteVerificationError) as caught:
        verify_tdx_quote(QUOTE, COLLATERAL, now=datetime(2025, 7, 20, tzinfo=UTC))
    assert caught.value.check == "collateral_expired"
    assert caught.value.message == "TCBInfo expired"
    assert str(caught.value) == "collateral_expired: TCBInfo expired"
    assert isinstance(caught.value, EvidenceError)


def test_the_expired_crl_is_named_with_dates():
    with pytest.raises(QuoteVerificationError) as caught:
        verify_tdx_quote(QUOTE, COLLATERAL, now=datetime(2026, 5, 1, tzinfo=UTC))
    assert caught.value.check == "collateral_expired"
    assert caught.value.message == (
        "CrlExpired { time: 2026-05-01T00:00:00Z, next_update: 2026-04-03T11:21:57Z }"
    )


def test_the_quote_fails_before_its_collateral_is_issued():
    with pytest.raises(QuoteVerificationError) as caught:
        verify_tdx_quote(QUOTE, COLLATERAL, now=datetime(2025, 6, 1, tzinfo=UTC))
    assert caught.value.check == "collateral_not_yet_valid"


def test_a_naive_time_is_refused():
    with pytest.raises(ValueError, match="timezone"):
        verify_tdx_quote(QUOTE, COLLATERAL, now=datetime(2025, 7, 1))


@pytest.mark.parametrize(
    ("quote", "collateral", "check"),
    [
        pytest.param(QUOTE, "not json", "collateral_format", id="collateral not JSON"),
        pytest.param(QUOTE, "{}", "collateral_format", id="collateral without fields"),
        pytest.param(QUOTE, b"\xff{}", "collateral_format", id="collateral not UTF-8"),
        pytest.param(QUOTE[:600], COLLATERAL, "quote_format", id="truncated quote"),
        pytest.param(b"", COLLATERAL, "quote_format", id="empty quote"),
    ],
)
def test_unreadable_input_is_refused(quote: bytes, collateral: str | bytes, check: str):
    with pytest.raises(QuoteVerificationError) as caught:
        verify_tdx_quote(quote, collateral, now=INSIDE_VALIDITY)
    assert caught.value.check == check


@pytest.mark.parametrize(
    ("dcap_error", "check"),
    [
        ("Verification failed: TCB status is invalid: Revoked", "tcb_status"),
        ("Verification failed: Debug mode is enabled", "td_attributes"),
        ("Verification failed: SEPT_VE_DISABLE is not enabled", "td_attributes"),
        ("Verification failed: Fmspc mismatch", "tcb_info"),
        ("Verification failed: No matching TCB level found", "tcb_info"),
        (
            "Verification failed: Failed to verify certificate chain\n\nCaused by:\n    "
            "CertRevoked",
            "certificate_revoked",
        ),
        (
            "Verification failed: Failed to verify certificate chain\n\nCaused by:\n    "
            "CertExpired { time: UnixTime(1800000000), not_after: UnixTime(1700000000) }",
            "certificate_expired",
        ),
        ("Verification failed: QE MRSIGNER mismatch: expected AA, got BB", "qe_identity"),
        ("Verification failed: something new", "verification"),
    ],
)
def test_dcap_errors_the_sample_cannot_reach_are_named(dcap_error: str, check: str):
    error = _from_dcap(dcap_error)
    assert error.check == check
    assert "Verification failed" not in error.message
    assert "\n" not in error.message


def test_the_default_policy_refuses_a_status_other_than_up_to_date():
    outdated = result(tcb_status="OutOfDate", advisory_ids=("INTEL-SA-00837",))
    with pytest.raises(QuoteVerificationError) as caught:
        TcbPolicy().check(outdated)
    assert caught.value.check == "tcb_status"
    assert caught.value.message == (
        "TCB status OutOfDate is not accepted (accepted: UpToDate; advisories: INTEL-SA-00837)"
    )
    TcbPolicy().check(result())


def test_a_listed_status_is_accepted():
    policy = TcbPolicy(accepted_statuses=frozenset({"UpToDate", "SWHardeningNeeded"}))
    policy.check(result(tcb_status="SWHardeningNeeded"))
    with pytest.raises(QuoteVerificationError, match="ConfigurationNeeded"):
        policy.check(result(tcb_status="ConfigurationNeeded"))


def test_an_unknown_status_in_a_policy_is_refused():
    with pytest.raises(ValueError, match="unknown TCB status UptoDate"):
        TcbPolicy(accepted_statuses=frozenset({"UptoDate"}))


def test_pinned_measurements_pass_when_they_match_in_any_case():
    Measurements({"mrtd": MRTD.upper(), "rtmr0": RTMR0, "RTMR3": RTMR3}).check(verify())
    Measurements({}).check(verify())


@pytest.mark.parametrize("name", ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"])
def test_a_wrong_measurement_fails_with_its_name(name: str):
    wrong = "ab" * 48
    with pytest.raises(QuoteVerificationError) as caught:
        Measurements({name: wrong}).check(verify())
    assert caught.value.check == f"measurement:{name}"
    assert caught.value.message == (
        f"{name.upper()} is {verify().measurements[name]}, expected {wrong}"
    )


@pytest.mark.parametrize(
    ("expected", "problem"),
    [
        ({"mrseam": MRTD}, "unknown measurement 'mrseam'"),
        ({"mrtd": "zz" * 48}, "expected mrtd is not hex"),
        ({"mrtd": MRTD[:-2]}, "not 48 bytes of hex"),
        ({"rtmr1": f"{RTMR1[:10]} {RTMR1[10:-2]}"}, "not 48 bytes of hex"),
    ],
)
def test_malformed_expectations_are_refused(expected: dict[str, str], problem: str):
    with pytest.raises(ValueError, match=re.escape(problem)):
        Measurements(expected)


def test_the_binding_holds_for_the_key_and_nonce(signer: Signer):
    bound = report_data(signer.public_key_bytes, NONCE).ljust(64, b"\0")
    binding_check(result(report_data=bound.hex()), signer.public_key_bytes, NONCE)


def test_the_binding_fails_for_another_nonce_key_or_padding(signer: Signer):
    bound = report_data(signer.public_key_bytes, NONCE)
    cases = [
        (bound.ljust(64, b"\0"), signer.public_key_bytes, b"\x07" * 32),
        (bound.ljust(64, b"\0"), b"\x02" + b"\x01" * 32, NONCE),
        (bound.ljust(64, b"\x01"), signer.public_key_bytes, NONCE),
    ]
    for value, public_key, nonce in cases:
        with pytest.raises(QuoteVerificationError) as caught:
            binding_check(result(report_data=value.hex()), public_key, nonce)
        assert caught.value.check == "binding"


def test_the_sample_is_not_bound_to_a_nilai_key(signer: Signer):
    with pytest.raises(QuoteVerificationError, match="binding"):
        binding_check(verify(), signer.public_key_bytes, NONCE)


def test_importing_the_module_does_not_import_dcap_qvl():
    code = "import sys, nilai.attestation.tdx; print('dcap_qvl' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
