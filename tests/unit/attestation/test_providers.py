import asyncio
import base64
import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from coincurve import PrivateKey

from nilai.attestation import tsm
from nilai.attestation.base import EvidenceError, report_data
from nilai.attestation.factory import make_attestation_provider
from nilai.attestation.http import MAX_BODY_BYTES, HttpAttester
from nilai.attestation.report import build_report, check_query, parse_nonce
from nilai.attestation.simulated import NOTICE, SimulatedProvider, verify_document
from nilai.attestation.tsm import TsmProvider, collect_quote
from nilai.crypto.keys import Signer
from nilai.crypto.verify import VerificationError, verify_response
from nilai.errors import UpstreamProtocolError, UpstreamTimeout, ValidationFailed
from tests.support.fake_tsm import SEV_SNP_REPORT_DATA_OFFSET, FakeConfigfs
from tests.support.servers import wait_until

ATTESTER = "http://attester.internal:9000/v2/report"
DATA = hashlib.sha256(b"some key and nonce").digest()
CPU_REPORT = {"report_data": DATA.hex(), "measurement": "ab"}
"""An attester's JSON CPU report carrying the report_data it was asked for."""


# --- report_data ---------------------------------------------------------------------------


def test_report_data_is_sha256_of_key_then_nonce(signer):
    nonce = bytes(range(32))
    bound = report_data(signer.public_key_bytes, nonce)
    assert bound == hashlib.sha256(signer.public_key_bytes + nonce).digest()
    assert len(bound) == 32
    assert bound != hashlib.sha256(nonce + signer.public_key_bytes).digest()
    assert bound != report_data(signer.public_key_bytes, nonce[:-1] + b"\xff")


# --- nonce rules and the report body ---------------------------------------------------------


def test_parse_nonce_accepts_hex_up_to_64_bytes():
    assert parse_nonce("00ff") == b"\x00\xff"
    assert parse_nonce("AbCd") == b"\xab\xcd"
    assert parse_nonce("11" * 64) == b"\x11" * 64


def test_parse_nonce_without_value_picks_32_fresh_bytes():
    first, second = parse_nonce(None), parse_nonce(None)
    assert len(first) == len(second) == 32
    assert first != second


@pytest.mark.parametrize("value", ["", "0", "abc", "zz", "ab cd", " abcd", "0x12", "11" * 65])
def test_parse_nonce_refuses_anything_else_naming_the_param(value):
    with pytest.raises(ValidationFailed) as caught:
        parse_nonce(value)
    assert caught.value.param == "nonce"
    assert caught.value.status == 422


def test_check_query_accepts_one_nonce_or_none():
    check_query([])
    check_query([("nonce", "00")])


@pytest.mark.parametrize(
    ("items", "param"),
    [
        ([("nonce", "00"), ("nonce", "11")], "nonce"),
        ([("nonce", "00"), ("cache", "1")], "cache"),
        ([("", "null")], ""),
        ([("x" * 100, "1")], "x" * 40 + "..."),
    ],
)
def test_check_query_refuses_ambiguous_queries(items, param):
    with pytest.raises(ValidationFailed) as caught:
        check_query(items)
    assert caught.value.param == param


async def test_build_report_binds_key_and_nonce(signer):
    nonce = b"\x01" * 16
    body = await build_report(SimulatedProvider(signer), signer.public_key_bytes, nonce)
    assert body.verifying_key == signer.public_key_b64
    assert body.nonce == nonce.hex()
    assert body.report_data == report_data(signer.public_key_bytes, nonce).hex()
    assert body.provider == "simulated"
    assert body.simulated is True
    assert json.loads(body.cpu_attestation)["kind"] == "cpu"
    assert body.gpu_attestation is not None
    assert json.loads(body.gpu_attestation)["kind"] == "gpu"


# --- simulated -----------------------------------------------------------------------------


async def test_simulated_evidence_is_marked_signed_and_verifiable(signer):
    provider = SimulatedProvider(signer)
    assert (provider.name, provider.simulated) == ("simulated", True)
    evidence = await provider.report(DATA)
    assert evidence.gpu_attestation is not None
    for kind, text in (("cpu", evidence.cpu_attestation), ("gpu", evidence.gpu_attestation)):
        doc = verify_document(text, kind=kind, public_key=signer.public_key_bytes, report_data=DATA)
        assert doc["simulated"] is True
        assert doc["notice"] == NOTICE
        assert doc["report_data"] == DATA.hex()
        assert doc["verifying_key"] == signer.public_key_b64


async def test_simulated_evidence_fails_for_another_key_data_kind_or_any_change(signer):
    evidence = await SimulatedProvider(signer).report(DATA)
    cpu = evidence.cpu_attestation
    key = signer.public_key_bytes
    other_key = Signer(PrivateKey()).public_key_bytes
    with pytest.raises(EvidenceError, match="not signed"):
        verify_document(cpu, kind="cpu", public_key=other_key, report_data=DATA)
    with pytest.raises(EvidenceError, match="other report_data"):
        verify_document(cpu, kind="cpu", public_key=key, report_data=b"\x00" * 32)
    with pytest.raises(EvidenceError, match="'cpu' evidence"):
        verify_document(cpu, kind="gpu", public_key=key, report_data=DATA)
    doc = json.loads(cpu)
    doc["issued_at"] += 1
    with pytest.raises(EvidenceError, match="not signed"):
        verify_document(json.dumps(doc), kind="cpu", public_key=key, report_data=DATA)
    for garbage in ("not json", "[1]", json.dumps({"format": "other"})):
        with pytest.raises(EvidenceError):
            verify_document(garbage, kind="cpu", public_key=key, report_data=DATA)


async def test_simulated_evidence_cannot_pass_as_a_signed_answer(signer):
    evidence = await SimulatedProvider(signer).report(DATA)
    with pytest.raises(VerificationError):
        verify_response(evidence.cpu_attestation.encode(), signer.public_key_b64)


# --- configfs-tsm --------------------------------------------------------------------------


async def test_tsm_writes_padded_report_data_and_returns_the_quote(tmp_path, monkeypatch):
    fake = FakeConfigfs(tmp_path / "report", monkeypatch)
    provider = TsmProvider(fake.root, timeout_s=5)
    assert (provider.name, provider.simulated) == ("tsm", False)
    evidence = await provider.report(DATA)

    assert fake.inblobs == [DATA + b"\0" * 32]
    quote = base64.b64decode(evidence.cpu_attestation)
    assert quote[SEV_SNP_REPORT_DATA_OFFSET : SEV_SNP_REPORT_DATA_OFFSET + 32] == DATA
    assert evidence.gpu_attestation is None
    assert evidence.details["tsm_provider"] == "sev_guest"
    assert evidence.details["generation"] == "0"
    assert base64.b64decode(evidence.details["auxblob"]) == b"fake-certificates"
    assert fake.entries() == []  # the entry is removed


async def test_tsm_concurrent_reports_use_their_own_entries(tmp_path, monkeypatch):
    fake = FakeConfigfs(tmp_path / "report", monkeypatch, auxblob=None)
    provider = TsmProvider(fake.root, timeout_s=5)
    datas = [bytes([i]) * 32 for i in range(6)]
    results = await asyncio.gather(*(provider.report(data) for data in datas))
    for data, evidence in zip(datas, results, strict=True):
        quote = base64.b64decode(evidence.cpu_attestation)
        assert quote[SEV_SNP_REPORT_DATA_OFFSET : SEV_SNP_REPORT_DATA_OFFSET + 32] == data
        assert "auxblob" not in evidence.details
    assert len(set(fake.made)) == 6
    assert fake.entries() == []


async def test_tsm_missing_interface_is_a_502_without_the_path(tmp_path):
    provider = TsmProvider(tmp_path / "no-configfs", timeout_s=5)
    with pytest.raises(UpstreamProtocolError) as caught:
        await provider.report(DATA)
    assert caught.value.status == 502
    assert "no-configfs" not in caught.value.message
    with pytest.raises(tsm.TsmError, match="does not exist"):
        collect_quote(tmp_path / "no-configfs", DATA)


async def test_tsm_root_that_is_not_configfs_leaves_nothing_behind(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(tsm.TsmError, match="inblob"):
        collect_quote(plain, DATA)
    assert list(plain.iterdir()) == []
    with pytest.raises(UpstreamProtocolError):
        await TsmProvider(plain, timeout_s=5).report(DATA)


async def test_tsm_empty_quote_is_a_502_and_the_entry_is_removed(tmp_path, monkeypatch):
    fake = FakeConfigfs(tmp_path / "report", monkeypatch, empty_quote=True)
    with pytest.raises(UpstreamProtocolError):
        await TsmProvider(fake.root, timeout_s=5).report(DATA)
    assert fake.entries() == []


async def test_tsm_entry_written_by_someone_else_is_refused(tmp_path, monkeypatch):
    fake = FakeConfigfs(tmp_path / "report", monkeypatch)
    real_read = tsm._read_optional
    generations = iter(["1", "2"])

    def read(path: Path) -> str | None:
        return next(generations) if path.name == "generation" else real_read(path)

    monkeypatch.setattr(tsm, "_read_optional", read)
    with pytest.raises(tsm.TsmError, match="someone else"):
        collect_quote(fake.root, DATA)
    assert fake.entries() == []


async def test_tsm_slow_report_is_a_504(tmp_path, monkeypatch):
    def slow(root: Path, data: bytes) -> None:
        time.sleep(0.3)

    monkeypatch.setattr(tsm, "collect_quote", slow)
    with pytest.raises(UpstreamTimeout) as caught:
        await TsmProvider(tmp_path, timeout_s=0.05).report(DATA)
    assert caught.value.status == 504


class StuckQuotes:
    """``collect_quote`` stand-in whose threads stay in the "kernel" until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.started = 0
        self.inside = 0
        self.most_inside = 0
        self.thread_names: set[str] = set()

    def __call__(self, root: Path, data: bytes) -> tsm.TsmQuote:
        with self.lock:
            self.started += 1
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.thread_names.add(threading.current_thread().name)
        try:
            self.release.wait(timeout=30)
            return tsm.TsmQuote(b"quote over " + data, None, "sev_guest", "0")
        finally:
            with self.lock:
                self.inside -= 1


async def test_tsm_timed_out_quote_threads_keep_their_slots(tmp_path, monkeypatch):
    stuck = StuckQuotes()
    monkeypatch.setattr(tsm, "collect_quote", stuck)
    provider = TsmProvider(tmp_path, timeout_s=1.0)
    try:
        # Four requests fill the four slots; their quotes hang and the requests time out.
        first = await asyncio.gather(
            *(provider.report(DATA) for _ in range(4)), return_exceptions=True
        )
        assert all(isinstance(result, UpstreamTimeout) for result in first)
        # Two more, while those threads are still in the kernel, time out waiting for a slot:
        # no fifth thread is started.
        second = await asyncio.gather(
            *(provider.report(DATA) for _ in range(2)), return_exceptions=True
        )
        assert all(isinstance(result, UpstreamTimeout) for result in second)
        assert (stuck.started, stuck.most_inside) == (4, 4)
        assert provider.running == 4

        stuck.release.set()  # the kernel returns: the slots come back with the threads
        await asyncio.to_thread(wait_until, lambda: provider.running == 0, timeout_s=10)
        evidence = await provider.report(DATA)
        assert base64.b64decode(evidence.cpu_attestation) == b"quote over " + DATA
        assert stuck.started == 5
    finally:
        stuck.release.set()
        await provider.aclose()


async def test_tsm_quotes_run_in_the_providers_own_threads(tmp_path, monkeypatch):
    before = {thread.name for thread in threading.enumerate()}
    stuck = StuckQuotes()
    stuck.release.set()
    monkeypatch.setattr(tsm, "collect_quote", stuck)
    provider = TsmProvider(tmp_path, timeout_s=5)
    # Building the provider starts no thread; the first report does.
    assert {thread.name for thread in threading.enumerate()} == before
    await asyncio.gather(*(provider.report(DATA) for _ in range(6)))
    assert stuck.started == 6
    assert stuck.thread_names  # not the loop's default pool, which DNS lookups share
    assert all(name.startswith("nilai-tsm") for name in stuck.thread_names)
    assert len(stuck.thread_names) <= tsm.MAX_CONCURRENT_REPORTS

    await provider.aclose()
    await asyncio.to_thread(
        wait_until,
        lambda: not any(t.name.startswith("nilai-tsm") for t in threading.enumerate()),
        timeout_s=10,
    )
    with pytest.raises(UpstreamProtocolError):  # closed: no new quote thread
        await provider.report(DATA)
    assert stuck.started == 6


def test_tsm_refuses_report_data_over_64_bytes(tmp_path):
    with pytest.raises(ValueError, match="at most 64"):
        collect_quote(tmp_path, b"x" * 65)


# --- nilCC-style HTTP attester -------------------------------------------------------------


def attester(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_http_sends_report_data_as_hex_and_keeps_cpu_and_gpu_apart():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "cpu_attestation": json.dumps(CPU_REPORT),
                "gpu_attestation": "gpu-token",
                "nonce": DATA.hex(),
            },
        )

    async with attester(handler) as client:
        provider = HttpAttester(ATTESTER, client, timeout_s=5)
        assert (provider.name, provider.simulated) == ("http", False)
        evidence = await provider.report(DATA)
    assert json.loads(evidence.cpu_attestation) == CPU_REPORT
    assert evidence.gpu_attestation == "gpu-token"
    assert seen[0].method == "GET"
    assert seen[0].url.path == "/v2/report"
    assert seen[0].url.params["nonce"] == DATA.hex()


async def test_http_keeps_the_query_of_the_configured_url():
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={"cpu_attestation": CPU_REPORT})

    async with attester(handler) as client:
        await HttpAttester(f"{ATTESTER}?workload=nilai", client, timeout_s=5).report(DATA)
    assert seen[0].params["workload"] == "nilai"
    assert seen[0].params["nonce"] == DATA.hex()


async def test_http_accepts_report_objects_and_gpu_token_names():
    def handler(request: httpx.Request) -> httpx.Response:
        # nilCC's attester writes the SEV-SNP report's 64-byte report_data as byte values.
        report = {"measurement": "ab", "report_data": list(DATA.ljust(64, b"\0"))}
        return httpx.Response(200, json={"report": report, "gpu_token": "jwt"})

    async with attester(handler) as client:
        evidence = await HttpAttester(ATTESTER, client, timeout_s=5).report(DATA)
    assert json.loads(evidence.cpu_attestation)["measurement"] == "ab"
    assert evidence.gpu_attestation == "jwt"


async def test_http_without_gpu_evidence_has_none():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"cpu_attestation": CPU_REPORT, "gpu_attestation": None})

    async with attester(handler) as client:
        evidence = await HttpAttester(ATTESTER, client, timeout_s=5).report(DATA)
    assert evidence.gpu_attestation is None


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, content=b"<html>garbage</html>"),
        httpx.Response(200, json=["not", "an", "object"]),
        httpx.Response(200, json={"gpu_attestation": "only-gpu"}),
        httpx.Response(200, json={"cpu_attestation": ""}),
        httpx.Response(200, json={"cpu_attestation": 42}),
        httpx.Response(200, json={"cpu_attestation": CPU_REPORT, "nonce": "00" * 32}),
        httpx.Response(200, json={"cpu_attestation": CPU_REPORT, "report_data": 7}),
        httpx.Response(200, content=b"x" * (MAX_BODY_BYTES + 1)),
        httpx.Response(500, json={"error": "secret internal detail"}),
        httpx.Response(404, text="not found"),
    ],
)
async def test_http_unusable_answers_are_502_without_detail(response):
    async with attester(lambda request: response) as client:
        with pytest.raises(UpstreamProtocolError) as caught:
            await HttpAttester(ATTESTER, client, timeout_s=5).report(DATA)
    assert caught.value.status == 502
    assert "secret" not in caught.value.message
    assert "attester.internal" not in caught.value.message


@pytest.mark.parametrize(
    "cpu",
    [
        "opaque-quote",
        base64.b64encode(b"not a quote").decode(),
        {"measurement": "ab"},
        {"report_data": "00" * 32},
        {"report_data": DATA.hex() + "ff"},
    ],
)
async def test_http_evidence_must_carry_the_report_data_sent(cpu, caplog):
    # A client could not find report_data in this evidence, so it is refused here already.
    async with attester(lambda request: httpx.Response(200, json={"report": cpu})) as client:
        with pytest.raises(UpstreamProtocolError) as caught:
            await HttpAttester(ATTESTER, client, timeout_s=5).report(DATA)
    assert caught.value.code == "attester_invalid_response"
    assert "report_data" in caplog.text


async def test_http_unreachable_attester_is_502():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused to 10.0.0.7", request=request)

    async with attester(handler) as client:
        with pytest.raises(UpstreamProtocolError) as caught:
            await HttpAttester(ATTESTER, client, timeout_s=5).report(DATA)
    assert caught.value.code == "attester_unreachable"
    assert "10.0.0.7" not in caught.value.message


async def test_http_attester_breaking_off_is_502():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    async with attester(handler) as client:
        with pytest.raises(UpstreamProtocolError) as caught:
            await HttpAttester(ATTESTER, client, timeout_s=5).report(DATA)
    assert caught.value.code == "attester_invalid_response"


async def test_http_read_timeout_is_504():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with attester(handler) as client:
        with pytest.raises(UpstreamTimeout) as caught:
            await HttpAttester(ATTESTER, client, timeout_s=5).report(DATA)
    assert caught.value.status == 504


async def test_http_overall_time_limit_is_504():
    cut_off = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cut_off.set()
            raise
        return httpx.Response(200, json={"cpu_attestation": CPU_REPORT})

    async with attester(handler) as client:
        with pytest.raises(UpstreamTimeout):
            await HttpAttester(ATTESTER, client, timeout_s=0.1).report(DATA)
    assert cut_off.is_set()  # the attester was still answering when the limit ended the call


# --- factory -------------------------------------------------------------------------------


async def test_factory_builds_each_provider(signer, tmp_path):
    async with httpx.AsyncClient() as http:
        common = {"signer": signer, "http": http, "tsm_path": tmp_path, "timeout_s": 10.0}
        simulated = make_attestation_provider("simulated", url=None, **common)
        remote = make_attestation_provider("http", url=ATTESTER, **common)
        kernel = make_attestation_provider("tsm", url=None, **common)
    assert isinstance(simulated, SimulatedProvider)
    assert isinstance(remote, HttpAttester)
    assert isinstance(kernel, TsmProvider)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"provider": "http"}, "needs NILAI_ATTESTATION_URL"),
        ({"provider": "http", "url": ""}, "needs NILAI_ATTESTATION_URL"),
        ({"provider": "http", "url": "ftp://attester"}, "http:// or https://"),
        ({"provider": "tsm", "tsm_path": "missing"}, "not a directory"),
        ({"provider": "sgx"}, "unknown; use one of simulated, http, tsm"),
        ({"provider": "simulated", "timeout_s": 0.0}, "must be positive"),
    ],
)
async def test_factory_refuses_unusable_settings(signer, tmp_path, settings, message):
    values = {"url": None, "tsm_path": "", "timeout_s": 10.0, **settings}
    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match=message):
            make_attestation_provider(
                values["provider"],
                signer=signer,
                http=http,
                url=values["url"],
                tsm_path=tmp_path / values["tsm_path"],
                timeout_s=values["timeout_s"],
            )
