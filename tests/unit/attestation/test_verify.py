import base64
import json

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


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(PrivateKey())


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
    assert verified.quote_check is None
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


async def test_http_evidence_is_bound_but_the_quote_is_left_to_vendor_tools(signer):
    provider = Fixed("http", Evidence("opaque-cpu-quote", "opaque-gpu-token"))
    report = await build_report(provider, signer.public_key_bytes, NONCE)
    verified = verify_report(
        report.model_dump_json(), public_key=signer.public_key_bytes, nonce=NONCE
    )
    assert verified.simulated is False
    assert verified.quote_check is None


async def test_tsm_quote_must_carry_report_data(signer, tmp_path, monkeypatch):
    fake = FakeConfigfs(tmp_path / "report", monkeypatch)
    provider = TsmProvider(fake.root, timeout_s=5)
    report = await build_report(provider, signer.public_key_bytes, NONCE)
    verified = verify_report(
        report.model_dump_json(), public_key=signer.public_key_bytes, nonce=NONCE
    )
    assert verified.quote_check == "the SEV-SNP quote's user-data field holds report_data"

    wrong = fake_sev_snp_report(b"\x00" * 32)
    tampered = report.model_copy(update={"cpu_attestation": base64.b64encode(wrong).decode()})
    with pytest.raises(EvidenceError, match="does not hold report_data"):
        verify_report(tampered.model_dump_json(), public_key=signer.public_key_bytes, nonce=NONCE)
    short = report.model_copy(update={"cpu_attestation": base64.b64encode(b"tiny").decode()})
    with pytest.raises(EvidenceError, match="too short"):
        verify_report(short.model_dump_json(), public_key=signer.public_key_bytes, nonce=NONCE)


@pytest.mark.parametrize(("version", "offset"), [(4, 568), (5, 574)])
async def test_tdx_quote_report_data_is_found_by_version(signer, version, offset):
    bound = report_data(signer.public_key_bytes, NONCE)
    quote = bytearray(offset + 64 + 100)
    quote[0:2] = version.to_bytes(2, "little")
    quote[4:8] = (0x81).to_bytes(4, "little")
    quote[offset : offset + 32] = bound
    evidence = Evidence(
        base64.b64encode(bytes(quote)).decode(), None, {"tsm_provider": "tdx_guest"}
    )
    report = await build_report(Fixed("tsm", evidence), signer.public_key_bytes, NONCE)
    verified = verify_report(
        report.model_dump_json(), public_key=signer.public_key_bytes, nonce=NONCE
    )
    assert verified.quote_check == "the TDX quote's user-data field holds report_data"


def test_decode_public_key(signer):
    assert decode_public_key(signer.public_key_b64) == signer.public_key_bytes
    uncompressed = PrivateKey().public_key.format(compressed=False)
    for bad in ("not base64!", base64.b64encode(b"\x05" + b"\x01" * 32).decode(), ""):
        with pytest.raises(ValueError, match="public key"):
            decode_public_key(bad)
    with pytest.raises(ValueError, match="33-byte"):
        decode_public_key(base64.b64encode(uncompressed).decode())
