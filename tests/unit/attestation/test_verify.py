import base64
import json
from pathlib import Path

import pytest
from coincurve import PrivateKey

from nilai.attestation.base import Evidence, EvidenceError, report_data
from nilai.attestation.report import build_report
from nilai.attestation.simulated import SimulatedProvider
from nilai.attestation.tsm import TsmProvider
from nilai.attestation.verify import decode_public_key, verify_report
from nilai.crypto.keys import Signer
from tests.support.fake_tsm import FakeConfigfs, fake_sev_snp_report

NONCE = bytes(range(32))
TDX_SAMPLE = Path(__file__).parent / "samples" / "tdx_quote"
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
    assert verified.proven == (
        "CPU and GPU documents signed by the gateway's key over report_data",
    )
    assert verified.unverified  # simulated: the hardware is never proven
    assert "SIMULATED" in verified.unverified[0]
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
    ["hex", "padded hex", "byte values (nilCC)", "base64 SEV-SNP report", "base64 TDX quote"],
)
async def test_http_evidence_carrying_report_data_is_bound_but_not_hardware_verified(signer, form):
    data = bound(signer)
    padded = data.ljust(64, b"\0")
    tdx = bytearray(TDX_SAMPLE.read_bytes())
    tdx[568 : 568 + 64] = padded
    cpu = {
        "hex": json.dumps({"report_data": data.hex()}),
        "padded hex": json.dumps({"report_data": padded.hex().upper()}),
        "byte values (nilCC)": json.dumps({"report_data": list(padded), "version": 3}),
        "base64 SEV-SNP report": base64.b64encode(fake_sev_snp_report(data)).decode(),
        "base64 TDX quote": base64.b64encode(bytes(tdx)).decode(),
    }[form]
    body = await hardware_report(signer, "http", Evidence(cpu, "opaque-gpu-token"))
    verified = verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE)
    assert verified.simulated is False
    assert len(verified.proven) == 1
    assert verified.proven[0].endswith("field holds report_data")
    assert verified.unverified[0].startswith(HARDWARE_SIGNATURE_NOT_VERIFIED)
    assert "gpu_attestation: not checked" in verified.unverified[1]


async def test_tsm_quote_must_carry_report_data(signer, tmp_path, monkeypatch):
    fake = FakeConfigfs(tmp_path / "report", monkeypatch)
    provider = TsmProvider(fake.root, timeout_s=5)
    report = await build_report(provider, signer.public_key_bytes, NONCE)
    verified = verify_report(
        report.model_dump_json(), public_key=signer.public_key_bytes, nonce=NONCE
    )
    assert verified.proven == ("the SEV-SNP report's REPORT_DATA field holds report_data",)
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


@pytest.mark.parametrize(("version", "offset"), [(4, 568), (5, 574)])
async def test_tdx_quote_report_data_is_found_by_version(signer, version, offset):
    quote = bytearray(offset + 64 + 100)
    quote[0:2] = version.to_bytes(2, "little")
    quote[4:8] = (0x81).to_bytes(4, "little")
    quote[offset : offset + 32] = bound(signer)
    evidence = Evidence(
        base64.b64encode(bytes(quote)).decode(), None, {"tsm_provider": "tdx_guest"}
    )
    verified = verify_report(
        await hardware_report(signer, "tsm", evidence),
        public_key=signer.public_key_bytes,
        nonce=NONCE,
    )
    assert verified.proven == ("the TDX quote's REPORTDATA field holds report_data",)
    assert verified.unverified[0].startswith(f"{HARDWARE_SIGNATURE_NOT_VERIFIED}: TDX quote")


async def test_a_real_tdx_quote_not_bound_to_the_key_is_refused(signer):
    evidence = Evidence(
        base64.b64encode(TDX_SAMPLE.read_bytes()).decode(), None, {"tsm_provider": "tdx_guest"}
    )
    body = await hardware_report(signer, "tsm", evidence)
    with pytest.raises(EvidenceError, match="TDX quote's REPORTDATA field does not hold"):
        verify_report(body, public_key=signer.public_key_bytes, nonce=NONCE)


def test_decode_public_key(signer):
    assert decode_public_key(signer.public_key_b64) == signer.public_key_bytes
    uncompressed = PrivateKey().public_key.format(compressed=False)
    for bad in ("not base64!", base64.b64encode(b"\x05" + b"\x01" * 32).decode(), ""):
        with pytest.raises(ValueError, match="public key"):
            decode_public_key(bad)
    with pytest.raises(ValueError, match="33-byte"):
        decode_public_key(base64.b64encode(uncompressed).decode())
