import base64
import dataclasses
import json
from datetime import UTC, datetime

import pytest
from coincurve import PrivateKey

from nilai.attestation import verify as verify_module
from nilai.attestation.base import Evidence, EvidenceError, report_data
from nilai.attestation.report import build_report
from nilai.attestation.simulated import SimulatedProvider
from nilai.attestation.tdx import TdxVerification
from nilai.attestation.tsm import TsmProvider
from nilai.attestation.verify import (
    GPU_UNVERIFIED,
    ReportVerificationError,
    TdxPolicy,
    check_quote,
    check_report,
    check_report_async,
    decode_public_key,
    verify_report,
)
from nilai.crypto.keys import Signer
from tests.fakes.pccs import FakePccs
from tests.support.fake_tsm import FakeConfigfs, fake_sev_snp_report
from tests.support.servers import ServerThread
from tests.unit.attestation.tdx_sample import (
    COLLATERAL,
    INSIDE_VALIDITY,
    MRTD,
    QUOTE,
    RTMR0,
    RTMR1,
    RTMR2,
)

NONCE = bytes(range(32))
HARDWARE_SIGNATURE_NOT_VERIFIED = "hardware signature not verified"


class Fixed:
    """A provider that returns whatever evidence it was given."""

    def __init__(self, name: str, evidence: Evidence, *, simulated: bool = False) -> None:
        self.name = name
        self.simulated = simulated
        self.evidence = evidence

    async def report(self, report_data: bytes) -> Evidence:
        return self.evidence


async def simulated_body(signer: Signer, nonce: bytes = NONCE) -> dict:
    report = await build_report(SimulatedProvider(signer), signer.public_key_bytes, nonce)
    return report.model_dump()


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()


async def test_a_fresh_simulated_report_verifies(signer):
    body = await simulated_body(signer)
    verified = verify_report(encode(body), public_key=signer.public_key_bytes, nonce=NONCE)
    assert verified.simulated is True
    assert [check.name for check in verified.checks] == [
        "report_format",
        "verifying_key",
        "nonce",
        "report_data",
        "simulated_documents",
    ]
    assert all(check.passed for check in verified.checks)
    assert verified.proven[-1] == (
        "CPU and GPU documents signed by the gateway's key over report_data"
    )
    assert verified.unverified  # simulated: the hardware is never proven
    assert "simulated, no hardware evidence" in verified.unverified[0]
    assert verified.report.report_data == report_data(signer.public_key_bytes, NONCE).hex()


async def test_another_key_is_refused(signer):
    body = await simulated_body(signer)
    other = Signer(PrivateKey()).public_key_bytes
    with pytest.raises(EvidenceError, match="wrong key"):
        verify_report(encode(body), public_key=other, nonce=NONCE)


async def test_a_replayed_report_is_refused(signer):
    body = await simulated_body(signer, nonce=b"\x07" * 32)
    with pytest.raises(EvidenceError, match=r"nonce mismatch.*replayed or stale"):
        verify_report(encode(body), public_key=signer.public_key_bytes, nonce=NONCE)


async def test_an_echoed_nonce_with_old_report_data_is_refused(signer):
    stale = await simulated_body(signer, nonce=b"\x07" * 32)
    stale["nonce"] = NONCE.hex()
    with pytest.raises(EvidenceError, match="report_data is not SHA-256"):
        verify_report(encode(stale), public_key=signer.public_key_bytes, nonce=NONCE)


async def test_swapped_cpu_and_gpu_evidence_is_refused(signer):
    body = await simulated_body(signer)
    body["cpu_attestation"], body["gpu_attestation"] = (
        body["gpu_attestation"],
        body["cpu_attestation"],
    )
    with pytest.raises(EvidenceError, match="cpu_attestation holds 'gpu' evidence"):
        verify_report(encode(body), public_key=signer.public_key_bytes, nonce=NONCE)


async def test_simulated_evidence_dressed_as_hardware_is_refused(signer):
    body = await simulated_body(signer)
    body.update(simulated=False, provider="http")
    with pytest.raises(EvidenceError, match="claims hardware evidence"):
        verify_report(encode(body), public_key=signer.public_key_bytes, nonce=NONCE)


async def test_evidence_signed_by_another_key_is_refused(signer):
    body = await simulated_body(signer)
    forged = await simulated_body(Signer(PrivateKey()))
    body["gpu_attestation"] = forged["gpu_attestation"]
    with pytest.raises(EvidenceError):
        verify_report(encode(body), public_key=signer.public_key_bytes, nonce=NONCE)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b"{}", json.dumps({"verifying_key": 1}).encode()],
)
def test_malformed_reports_are_refused(signer, body):
    with pytest.raises(EvidenceError, match="malformed"):
        verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE)


async def hardware_report(signer: Signer, provider: str, evidence: Evidence) -> bytes:
    report = await build_report(Fixed(provider, evidence), signer.public_key_bytes, NONCE)
    return report.model_dump_json().encode()


def bound(signer: Signer) -> bytes:
    return report_data(signer.public_key_bytes, NONCE)


@pytest.mark.parametrize(
    "cpu",
    [
        base64.b64encode(b"not a quote").decode(),  # an impostor with no TEE
        "opaque-cpu-quote",
        json.dumps({"measurement": "ab"}),  # a JSON report without report_data
        json.dumps({"report_data": "zz" * 32}),
        json.dumps({"report_data": [1, 2, 3]}),
        json.dumps({"report_data": [True] * 32}),
    ],
)
async def test_http_evidence_without_report_data_is_refused(signer, cpu):
    body = await hardware_report(signer, "http", Evidence(cpu, "opaque-gpu-token"))
    with pytest.raises(EvidenceError):
        verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE)


async def test_http_evidence_with_other_report_data_is_refused(signer):
    cpu = json.dumps({"report_data": (b"\x01" * 32).hex()})
    body = await hardware_report(signer, "http", Evidence(cpu))
    with pytest.raises(EvidenceError, match="report_data field does not hold report_data"):
        verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE)


@pytest.mark.parametrize(
    "form",
    ["hex", "padded hex", "byte values (nilCC)", "base64 SEV-SNP report"],
)
async def test_http_evidence_carrying_report_data_is_bound_but_not_hardware_verified(signer, form):
    data = bound(signer)
    padded = data.ljust(64, b"\0")
    cpu = {
        "hex": json.dumps({"report_data": data.hex()}),
        "padded hex": json.dumps({"report_data": padded.hex().upper()}),
        "byte values (nilCC)": json.dumps({"report_data": list(padded), "version": 3}),
        "base64 SEV-SNP report": base64.b64encode(fake_sev_snp_report(data)).decode(),
    }[form]
    body = await hardware_report(signer, "http", Evidence(cpu, "opaque-gpu-token"))
    verified = verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE)
    assert verified.simulated is False
    assert verified.checks[-1].name == "user_data"
    assert verified.proven[-1].endswith("field holds report_data")
    assert verified.unverified[0].startswith(HARDWARE_SIGNATURE_NOT_VERIFIED)
    assert verified.unverified[1] == GPU_UNVERIFIED


async def test_tsm_quote_must_carry_report_data(signer, tmp_path, monkeypatch):
    fake = FakeConfigfs(tmp_path / "report", monkeypatch)
    provider = TsmProvider(fake.root, timeout_s=5)
    report = await build_report(provider, signer.public_key_bytes, NONCE)
    verified = verify_report(
        report.model_dump_json(), public_key=signer.public_key_bytes, nonce=NONCE
    )
    assert verified.proven[-1] == "the SEV-SNP report's REPORT_DATA field holds report_data"
    assert verified.unverified == (
        f"{HARDWARE_SIGNATURE_NOT_VERIFIED}: SEV-SNP report "
        "(AMD VCEK/ASK/ARK chain, TCB version and launch measurement)",
    )

    wrong = fake_sev_snp_report(b"\x00" * 32)
    tampered = report.model_copy(update={"cpu_attestation": base64.b64encode(wrong).decode()})
    with pytest.raises(EvidenceError, match="does not hold report_data"):
        verify_report(tampered.model_dump_json(), public_key=signer.public_key_bytes, nonce=NONCE)
    short = report.model_copy(update={"cpu_attestation": base64.b64encode(b"tiny").decode()})
    with pytest.raises(EvidenceError, match="too short"):
        verify_report(short.model_dump_json(), public_key=signer.public_key_bytes, nonce=NONCE)
    await provider.aclose()


@pytest.mark.parametrize("backend", ["sgx_guest", "arm_cca_guest", "sevvy", "tdxx", None])
async def test_tsm_quote_from_an_unknown_backend_is_refused(signer, backend):
    # A quote the verifier cannot read is refused, even if it would hold report_data somewhere.
    quote = fake_sev_snp_report(bound(signer))
    details = {} if backend is None else {"tsm_provider": backend}
    evidence = Evidence(base64.b64encode(quote).decode(), None, details)
    body = await hardware_report(signer, "tsm", evidence)
    with pytest.raises(EvidenceError, match="unknown TSM backend"):
        verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE)


@pytest.mark.parametrize("provider", ["sgx", "nitro", "simulated"])
async def test_hardware_evidence_from_an_unknown_provider_is_refused(signer, provider):
    evidence = Evidence(json.dumps({"report_data": bound(signer).hex()}))
    body = await hardware_report(signer, provider, evidence)
    with pytest.raises(EvidenceError, match="unknown provider"):
        verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE)


def rebound_sample(signer: Signer) -> bytes:
    """The sample quote with REPORTDATA replaced by this key's binding (signature broken)."""
    quote = bytearray(QUOTE)
    quote[568 : 568 + 64] = bound(signer).ljust(64, b"\0")
    return bytes(quote)


def tdx_evidence(quote: bytes, **details: str) -> Evidence:
    return Evidence(
        base64.b64encode(quote).decode(), None, {"tsm_provider": "tdx_guest", **details}
    )


AT_SAMPLE_TIME = TdxPolicy(at=INSIDE_VALIDITY, collateral=COLLATERAL)


@pytest.mark.parametrize(("version", "offset"), [(4, 568), (5, 574)])
async def test_a_tdx_quote_is_never_trusted_for_its_raw_reportdata(signer, version, offset):
    # Before, REPORTDATA was read from the raw bytes; now only the verified report body counts.
    quote = bytearray(offset + 64 + 100)
    quote[0:2] = version.to_bytes(2, "little")
    quote[4:8] = (0x81).to_bytes(4, "little")
    quote[offset : offset + 32] = bound(signer)
    body = await hardware_report(signer, "tsm", tdx_evidence(bytes(quote)))
    result = check_report(body, public_key=signer.public_key_bytes, nonce=NONCE)
    assert result.failed is not None
    assert result.failed.name == "collateral_missing"
    with_collateral = check_report(
        body, public_key=signer.public_key_bytes, nonce=NONCE, policy=AT_SAMPLE_TIME
    )
    assert with_collateral.failed is not None
    assert with_collateral.failed.name == "quote_format"


async def test_a_tdx_quote_without_collateral_fails_as_collateral_missing(signer):
    body = await hardware_report(signer, "tsm", tdx_evidence(QUOTE))
    with pytest.raises(ReportVerificationError) as caught:
        verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE)
    assert caught.value.check == "collateral_missing"
    assert "--collateral" in str(caught.value)


async def test_a_real_tdx_quote_verifies_then_fails_the_binding_on_its_verified_body(signer):
    body = await hardware_report(signer, "tsm", tdx_evidence(QUOTE))
    result = check_report(
        body, public_key=signer.public_key_bytes, nonce=NONCE, policy=AT_SAMPLE_TIME
    )
    assert [(check.name, check.passed) for check in result.checks][-3:] == [
        ("collateral", True),
        ("tdx_quote", True),
        ("binding", False),
    ]
    assert result.tdx is not None
    assert result.tdx.mrtd == MRTD


async def test_a_tdx_quote_rebound_to_the_key_fails_its_signature(signer):
    # Writing the right REPORTDATA into a genuine quote is exactly the forgery this stops.
    for provider, evidence in (
        ("tsm", tdx_evidence(rebound_sample(signer))),
        ("http", Evidence(base64.b64encode(rebound_sample(signer)).decode())),
    ):
        body = await hardware_report(signer, provider, evidence)
        result = check_report(
            body, public_key=signer.public_key_bytes, nonce=NONCE, policy=AT_SAMPLE_TIME
        )
        assert result.failed is not None
        assert result.failed.name == "quote_signature"


async def test_the_gateways_attached_collateral_is_used_unless_the_policy_gives_one(signer):
    evidence = tdx_evidence(QUOTE, tdx_collateral=COLLATERAL)
    body = await hardware_report(signer, "tsm", evidence)
    attached = check_report(
        body, public_key=signer.public_key_bytes, nonce=NONCE, policy=TdxPolicy(at=INSIDE_VALIDITY)
    )
    assert attached.collateral_source == "gateway"
    assert attached.failed is not None
    assert attached.failed.name == "binding"  # the quote itself verified with it
    refused = TdxPolicy(at=INSIDE_VALIDITY, use_attached_collateral=False)
    result = check_report(body, public_key=signer.public_key_bytes, nonce=NONCE, policy=refused)
    assert result.failed is not None
    assert result.failed.name == "collateral_missing"
    changed = flip_text(COLLATERAL)
    evidence = tdx_evidence(QUOTE, tdx_collateral=changed)
    body = await hardware_report(signer, "tsm", evidence)
    tampered = check_report(
        body, public_key=signer.public_key_bytes, nonce=NONCE, policy=TdxPolicy(at=INSIDE_VALIDITY)
    )
    assert tampered.failed is not None
    assert tampered.failed.name not in {"binding", "collateral_missing"}


def flip_text(collateral: str) -> str:
    """One bit changed in the TCB info's signature."""
    document = json.loads(collateral)
    signature = document["tcb_info_signature"]
    document["tcb_info_signature"] = f"{int(signature[0], 16) ^ 1:x}{signature[1:]}"
    return json.dumps(document)


async def test_collateral_is_fetched_from_the_policys_pccs_when_none_is_attached(signer):
    pccs = FakePccs(COLLATERAL)
    server = ServerThread(pccs.app).start()
    try:
        body = await hardware_report(signer, "tsm", tdx_evidence(QUOTE))
        policy = TdxPolicy(at=INSIDE_VALIDITY, pccs_url=server.url)
        result = await check_report_async(
            body, public_key=signer.public_key_bytes, nonce=NONCE, policy=policy
        )
        assert result.collateral_source == "pccs"
        assert [(check.name, check.passed) for check in result.checks][-2:] == [
            ("tdx_quote", True),
            ("binding", False),
        ]
        pccs.fail_status = 503
        down = await check_report_async(
            body, public_key=signer.public_key_bytes, nonce=NONCE, policy=policy
        )
    finally:
        server.stop()
    assert down.failed is not None
    assert down.failed.name == "collateral_missing"
    assert "answered 503" in down.failed.detail


# --- the policy layer, over verified results the hardware would give ------------------------


def verified_as(signer: Signer, status: str = "UpToDate", **measurements: str) -> TdxVerification:
    values = {"mrtd": MRTD, "rtmr0": "11" * 48, "rtmr1": "22" * 48, "rtmr2": "33" * 48}
    values |= {"rtmr3": "00" * 48, **measurements}
    return TdxVerification(
        tcb_status=status,
        advisory_ids=("INTEL-SA-00837",) if status != "UpToDate" else (),
        report_data=bound(signer).ljust(64, b"\0").hex(),
        **values,
    )


@pytest.fixture
def genuine(monkeypatch, signer):
    """Makes quote verification pass with a chosen result, as for a TDX VM bound to ``signer``."""

    def choose(result: TdxVerification) -> None:
        def verify(quote: bytes, collateral: str | bytes, *, now: datetime) -> TdxVerification:
            assert collateral == COLLATERAL
            assert now == INSIDE_VALIDITY
            return result

        monkeypatch.setattr(verify_module, "verify_tdx_quote", verify)

    return choose


async def tdx_body(signer: Signer) -> bytes:
    return await hardware_report(signer, "tsm", tdx_evidence(rebound_sample(signer)))


ALL_PINNED = {"mrtd": MRTD, "rtmr0": "11" * 48, "rtmr1": "22" * 48, "rtmr2": "33" * 48}
ALL_PINNED |= {"rtmr3": "00" * 48}


@pytest.mark.parametrize("status", ["SWHardeningNeeded", "OutOfDate", "ConfigurationNeeded"])
async def test_a_status_other_than_up_to_date_is_refused_by_default_and_accepted_if_listed(
    signer, genuine, status
):
    genuine(verified_as(signer, status))
    body = await tdx_body(signer)
    result = check_report(
        body, public_key=signer.public_key_bytes, nonce=NONCE, policy=AT_SAMPLE_TIME
    )
    assert result.failed is not None
    assert result.failed.name == "tcb_status"
    assert status in result.failed.detail
    assert "INTEL-SA-00837" in result.failed.detail
    allowed = TdxPolicy(
        at=INSIDE_VALIDITY,
        collateral=COLLATERAL,
        accepted_tcb_statuses=frozenset({"UpToDate", status}),
        measurements=ALL_PINNED,
    )
    accepted = verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE, policy=allowed)
    assert accepted.ok
    assert accepted.unverified == ()


async def test_a_bound_genuine_quote_with_pinned_measurements_is_fully_verified(signer, genuine):
    genuine(verified_as(signer))
    body = await tdx_body(signer)
    policy = TdxPolicy(at=INSIDE_VALIDITY, collateral=COLLATERAL, measurements=ALL_PINNED)
    result = verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE, policy=policy)
    assert [check.name for check in result.checks] == [
        "report_format",
        "verifying_key",
        "nonce",
        "report_data",
        "collateral",
        "tdx_quote",
        "binding",
        "tcb_status",
        "measurements",
    ]
    assert result.unverified == ()
    assert result.pinned == ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
    unpinned = verify_report(
        body, public_key=signer.public_key_bytes, nonce=NONCE, policy=AT_SAMPLE_TIME
    )
    assert unpinned.unverified[0].startswith("measurements not pinned: MRTD, RTMR0")


@pytest.mark.parametrize("name", ["mrtd", "rtmr0", "rtmr3"])
async def test_a_wrong_pinned_measurement_fails_with_its_name(signer, genuine, name):
    genuine(verified_as(signer))
    body = await tdx_body(signer)
    policy = TdxPolicy(
        at=INSIDE_VALIDITY, collateral=COLLATERAL, measurements={**ALL_PINNED, name: "ab" * 48}
    )
    with pytest.raises(ReportVerificationError) as caught:
        verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE, policy=policy)
    assert caught.value.check == f"measurement:{name}"


async def test_the_binding_is_checked_on_the_verified_body_not_the_raw_quote(signer, genuine):
    # The raw quote carries this key's binding; the verified body says otherwise: refused.
    genuine(dataclasses.replace(verified_as(signer), report_data="00" * 64))
    body = await tdx_body(signer)
    with pytest.raises(ReportVerificationError) as caught:
        verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE, policy=AT_SAMPLE_TIME)
    assert caught.value.check == "binding"


async def test_relayed_gpu_evidence_is_listed_as_unverified(signer, genuine):
    genuine(verified_as(signer))
    evidence = tdx_evidence(rebound_sample(signer))
    evidence = Evidence(evidence.cpu_attestation, "opaque-gpu-token", evidence.details)
    body = await hardware_report(signer, "tsm", evidence)
    policy = TdxPolicy(at=INSIDE_VALIDITY, collateral=COLLATERAL, measurements=ALL_PINNED)
    result = verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE, policy=policy)
    assert result.unverified == (GPU_UNVERIFIED,)


def test_a_policy_with_an_unknown_status_measurement_or_naive_time_is_refused():
    with pytest.raises(ValueError, match="unknown TCB status"):
        TdxPolicy(accepted_tcb_statuses=frozenset({"Revoked"}))
    with pytest.raises(ValueError, match="unknown measurement"):
        TdxPolicy(measurements={"mrowner": "00" * 48})
    with pytest.raises(ValueError, match="timezone"):
        TdxPolicy(at=datetime(2025, 7, 1))  # a naive time: refused


# --- bare quotes ----------------------------------------------------------------------------


def test_the_bare_sample_quote_verifies_at_its_time_and_lists_unpinned_measurements():
    result = check_quote(QUOTE, AT_SAMPLE_TIME)
    assert result.ok
    assert result.tdx is not None
    assert result.tdx.measurements == {
        "mrtd": MRTD,
        "rtmr0": RTMR0,
        "rtmr1": RTMR1,
        "rtmr2": RTMR2,
        "rtmr3": "00" * 48,
    }
    assert result.unverified[0].startswith("measurements not pinned")
    pinned = check_quote(
        QUOTE,
        TdxPolicy(at=INSIDE_VALIDITY, collateral=COLLATERAL, measurements=result.tdx.measurements),
    )
    assert pinned.ok
    assert pinned.unverified == ()


def test_the_bare_sample_quote_fails_as_expired_after_next_update():
    late = TdxPolicy(at=datetime(2025, 7, 20, tzinfo=UTC), collateral=COLLATERAL)
    result = check_quote(QUOTE, late)
    assert result.failed is not None
    assert result.failed.name == "collateral_expired"


def test_decode_public_key(signer):
    assert decode_public_key(signer.public_key_b64) == signer.public_key_bytes
    uncompressed = PrivateKey().public_key.format(compressed=False)
    for bad in ("not base64!", base64.b64encode(b"\x05" + b"\x01" * 32).decode(), ""):
        with pytest.raises(ValueError, match="public key"):
            decode_public_key(bad)
    with pytest.raises(ValueError, match="33-byte"):
        decode_public_key(base64.b64encode(uncompressed).decode())
