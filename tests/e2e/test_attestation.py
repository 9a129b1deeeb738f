"""``GET /v1/attestation/report`` on the real gateway, and ``nilai attest verify`` against it."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from coincurve import PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nilai.attestation import verify as verify_module
from nilai.attestation.simulated import NOTICE, verify_document
from nilai.attestation.tdx import TdxVerification
from nilai.attestation.verify import verify_report
from nilai.cli import attest
from tests.conftest import REDIS_URL, TEST_API_KEY
from tests.fakes.pccs import FakePccs
from tests.support.fake_tsm import FakeConfigfs
from tests.support.servers import ServerThread, free_port

pytestmark = pytest.mark.e2e


def get_report(
    gateway, nonce: str | None = None, *, headers: dict[str, str] | None = None, params=None
) -> httpx.Response:
    params = params if params is not None else {} if nonce is None else {"nonce": nonce}
    headers = gateway.auth if headers is None else headers
    return httpx.get(
        f"{gateway.url}/v1/attestation/report", params=params, headers=headers, timeout=10
    )


def public_key(gateway) -> bytes:
    return base64.b64decode(httpx.get(f"{gateway.url}/v1/public_key", timeout=10).json())


def attest_verify(*argv: str) -> int:
    """Run ``nilai attest verify`` as the command line would."""
    parser = argparse.ArgumentParser(prog="nilai")
    attest.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["attest", "verify", *argv])
    return args.handler(args)


@pytest.fixture
def serve() -> Iterator[Callable[[Starlette], ServerThread]]:
    started: list[ServerThread] = []

    def start(app: Starlette) -> ServerThread:
        thread = ServerThread(app).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


# --- the endpoint --------------------------------------------------------------------------


def test_report_echoes_the_nonce_and_binds_it_to_the_signing_key(start_gateway):
    gateway = start_gateway()
    nonce = secrets.token_bytes(32)
    response = get_report(gateway, nonce.hex())
    assert response.status_code == 200
    body = response.json()
    key = public_key(gateway)
    assert body["verifying_key"] == base64.b64encode(key).decode()
    assert body["nonce"] == nonce.hex()
    bound = hashlib.sha256(key + nonce).digest()
    assert body["report_data"] == bound.hex()
    assert (body["provider"], body["simulated"]) == ("simulated", True)
    verify_document(body["cpu_attestation"], kind="cpu", public_key=key, report_data=bound)
    verify_document(body["gpu_attestation"], kind="gpu", public_key=key, report_data=bound)
    assert verify_report(response.content, public_key=key, nonce=nonce).simulated


@pytest.mark.parametrize("nonce", ["00", "AB" * 64])
def test_nonce_bounds_and_case(start_gateway, nonce):
    gateway = start_gateway()
    body = get_report(gateway, nonce).json()
    assert body["nonce"] == nonce.lower()
    expected = hashlib.sha256(public_key(gateway) + bytes.fromhex(nonce)).hexdigest()
    assert body["report_data"] == expected


def test_without_a_nonce_the_server_picks_32_fresh_bytes(start_gateway):
    gateway = start_gateway()
    first, second = get_report(gateway).json(), get_report(gateway).json()
    assert len(bytes.fromhex(first["nonce"])) == 32
    assert first["nonce"] != second["nonce"]
    key = public_key(gateway)
    nonce = bytes.fromhex(first["nonce"])
    assert first["report_data"] == hashlib.sha256(key + nonce).hexdigest()


@pytest.mark.parametrize("nonce", ["xyz", "abc", "ab cd", "0x1234", "", "00" * 65])
def test_bad_nonce_is_422_naming_the_param(start_gateway, nonce):
    gateway = start_gateway()
    response = get_report(gateway, nonce)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "nonce"
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ([("nonce", "00"), ("nonce", "11")], "nonce"),
        ([("nonce", "00"), ("extra", "1")], "extra"),
    ],
)
def test_ambiguous_queries_are_422(start_gateway, params, param):
    gateway = start_gateway()
    response = get_report(gateway, params=params)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": "x"}]
)
def test_unauthenticated_is_401(start_gateway, headers):
    gateway = start_gateway()
    response = get_report(gateway, "00", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"


# --- nilai attest verify -------------------------------------------------------------------


def test_attest_verify_of_a_simulated_report_is_bound_but_exits_4(start_gateway, capsys):
    gateway = start_gateway()
    assert attest_verify(gateway.url, "--api-key", TEST_API_KEY) == attest.EXIT_SIMULATED == 4
    out = capsys.readouterr().out
    assert out.startswith(
        "SIMULATED: the report is bound to the key from /v1/public_key and to a fresh nonce, "
        "but it is simulated, no hardware evidence."
    )
    assert "passed simulated_documents: CPU and GPU documents signed by the gateway's key" in out
    assert f"NOT verified  hardware: simulated, no hardware evidence ({NOTICE}" in out
    assert out.rstrip().endswith(
        "exit status 4: simulated, no hardware evidence (pass --allow-simulated to accept)"
    )
    assert "OK" not in out


def test_attest_verify_accepts_a_simulated_report_only_with_allow_simulated(start_gateway, capsys):
    gateway = start_gateway()
    assert attest_verify(gateway.url, "--api-key", TEST_API_KEY, "--allow-simulated") == 0
    out = capsys.readouterr().out
    assert out.startswith("SIMULATED: ")
    assert "simulated, no hardware evidence" in out
    assert out.rstrip().endswith("exit status 0: simulated accepted (--allow-simulated)")


def test_attest_verify_help_lists_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as done:
        attest_verify("--help")
    assert done.value.code == 0
    out = capsys.readouterr().out
    for line in [
        "0  every check passed and nothing is left unverified",
        "1  a check failed; its name is printed",
        "2  usage or connection problem",
        "3  every check passed, but something is NOT verified: measurements not",
        "4  bound, but the evidence is simulated, no hardware evidence",
        "--expect-mrtd HEX",
        "--allow-tcb-status STATUS",
        "--collateral FILE",
        "--pccs-url URL",
        "--allow-simulated",
    ]:
        assert line in out


def test_attest_verify_reads_the_key_from_the_environment_and_pins(
    start_gateway, capsys, monkeypatch, tmp_path
):
    gateway = start_gateway()
    monkeypatch.setenv("NILAI_API_KEY", TEST_API_KEY)
    key = base64.b64encode(public_key(gateway)).decode()
    saved = tmp_path / "report.json"
    assert attest_verify(f"{gateway.url}/v1/", "--public-key", key, "--save", str(saved)) == 4
    assert "pinned key" in capsys.readouterr().out
    assert json.loads(saved.read_bytes())["verifying_key"] == key


def test_attest_verify_fails_for_a_wrong_public_key(start_gateway, capsys):
    gateway = start_gateway()
    other = base64.b64encode(PrivateKey().public_key.format()).decode()
    assert attest_verify(gateway.url, "--api-key", TEST_API_KEY, "--public-key", other) == 1
    assert capsys.readouterr().out.startswith("FAIL: verifying_key: wrong key")


def stale_server(recorded: dict[str, Any], key_b64: str, *, echo_nonce: bool) -> Starlette:
    """A gateway impostor that replays a report recorded earlier."""

    async def report(request: Request) -> JSONResponse:
        body = dict(recorded)
        if echo_nonce:
            body["nonce"] = request.query_params["nonce"]
        return JSONResponse(body)

    async def key(request: Request) -> JSONResponse:
        return JSONResponse(key_b64)

    return Starlette(routes=[Route("/v1/attestation/report", report), Route("/v1/public_key", key)])


@pytest.mark.parametrize(
    ("echo_nonce", "reason"),
    [(False, "FAIL: nonce: nonce mismatch"), (True, "FAIL: report_data: report_data is not")],
)
def test_attest_verify_fails_for_a_replayed_report(
    start_gateway, serve, capsys, echo_nonce, reason
):
    gateway = start_gateway()
    recorded = get_report(gateway, secrets.token_hex(32)).json()
    impostor = serve(stale_server(recorded, recorded["verifying_key"], echo_nonce=echo_nonce))
    assert attest_verify(impostor.url, "--api-key", TEST_API_KEY) == 1
    assert capsys.readouterr().out.startswith(reason)


def test_attest_verify_usage_and_connection_errors_are_2(start_gateway, capsys, monkeypatch):
    gateway = start_gateway()
    monkeypatch.delenv("NILAI_API_KEY", raising=False)
    assert attest_verify(gateway.url) == 2
    assert "no API key" in capsys.readouterr().err
    assert attest_verify(gateway.url, "--api-key", "wrong-key-0123456789") == 2
    assert "401" in capsys.readouterr().err
    assert attest_verify(gateway.url, "--api-key", "k", "--public-key", "nope") == 2
    nothing = f"http://127.0.0.1:{free_port()}"
    assert attest_verify(nothing, "--api-key", TEST_API_KEY) == 2
    assert "cannot reach" in capsys.readouterr().err


# --- hardware providers behind the real gateway --------------------------------------------


def nilcc_attester(*, fail: bool = False) -> Starlette:
    """A nilCC-style attester: GET ?nonce=<hex report_data> → CPU report and GPU token."""

    async def report(request: Request) -> JSONResponse:
        if fail:
            return JSONResponse({"error": "attester internal detail"}, status_code=500)
        nonce = request.query_params["nonce"]
        return JSONResponse(
            {"report": {"report_data": nonce, "kind": "cpu"}, "gpu_token": f"gpu:{nonce}"}
        )

    return Starlette(routes=[Route("/v2/report", report)])


def test_http_attester_evidence_through_the_gateway(start_gateway, serve, capsys):
    attester = serve(nilcc_attester())
    gateway = start_gateway(
        attestation_provider="http", attestation_url=f"{attester.url}/v2/report"
    )
    nonce = secrets.token_bytes(16)
    body = get_report(gateway, nonce.hex()).json()
    bound = hashlib.sha256(public_key(gateway) + nonce).hexdigest()
    assert (body["provider"], body["simulated"]) == ("http", False)
    assert json.loads(body["cpu_attestation"]) == {"report_data": bound, "kind": "cpu"}
    assert body["gpu_attestation"] == f"gpu:{bound}"

    assert attest_verify(gateway.url, "--api-key", TEST_API_KEY) == 3
    out = capsys.readouterr().out
    assert out.startswith("NOT FULLY VERIFIED: the report is bound")
    assert "passed user_data: the attester JSON report's report_data field holds report_data" in out
    assert "NOT verified  hardware signature not verified: attester JSON report" in out
    assert "NOT verified  gpu_attestation: relayed, not verified" in out
    assert "SIMULATED" not in out
    assert out.rstrip().endswith("exit status 3: not fully verified")


def impostor(key: PrivateKey, cpu_attestation: str, **fields: Any) -> Starlette:
    """A gateway with no TEE that claims hardware: the binding is right, the evidence is not."""
    public = key.public_key.format()

    async def report(request: Request) -> JSONResponse:
        nonce = bytes.fromhex(request.query_params["nonce"])
        body = {
            "verifying_key": base64.b64encode(public).decode(),
            "nonce": nonce.hex(),
            "report_data": hashlib.sha256(public + nonce).hexdigest(),
            "cpu_attestation": cpu_attestation,
            "gpu_attestation": None,
            "provider": "http",
            "simulated": False,
            "details": {},
            **fields,
        }
        return JSONResponse(body)

    async def public_key(request: Request) -> JSONResponse:
        return JSONResponse(base64.b64encode(public).decode())

    return Starlette(
        routes=[Route("/v1/attestation/report", report), Route("/v1/public_key", public_key)]
    )


@pytest.mark.parametrize(
    ("cpu", "fields", "reason"),
    [
        (base64.b64encode(b"not a quote").decode(), {}, "neither a TDX quote nor an SEV-SNP"),
        ("opaque evidence", {}, "neither a JSON report nor a base64 quote"),
        (json.dumps({"measurement": "ab"}), {}, "has no report_data"),
        (
            base64.b64encode(b"\0" * 0x4A0).decode(),
            {"provider": "tsm", "details": {"tsm_provider": "sgx_guest"}},
            "unknown TSM backend 'sgx_guest'",
        ),
        (base64.b64encode(b"\0" * 0x4A0).decode(), {"provider": "tsm"}, "unknown TSM backend"),
        ("anything", {"provider": "nitro"}, "unknown provider 'nitro'"),
    ],
)
def test_attest_verify_refuses_an_impostor_claiming_hardware(serve, capsys, cpu, fields, reason):
    server = serve(impostor(PrivateKey(), cpu, **fields))
    assert attest_verify(server.url, "--api-key", TEST_API_KEY) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL: evidence_format: ")
    assert reason in out


def test_failing_attester_is_a_502_without_detail(start_gateway, serve):
    attester = serve(nilcc_attester(fail=True))
    gateway = start_gateway(
        attestation_provider="http", attestation_url=f"{attester.url}/v2/report"
    )
    response = get_report(gateway, "00")
    assert response.status_code == 502
    error = response.json()["error"]
    assert "detail" not in error["message"]
    assert attester.url not in error["message"]


def test_unreachable_attester_is_a_502(start_gateway):
    url = f"http://127.0.0.1:{free_port()}/v2/report"
    gateway = start_gateway(attestation_provider="http", attestation_url=url)
    response = get_report(gateway, "00")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "attester_unreachable"


def test_tsm_quote_through_the_gateway(start_gateway, tmp_path, monkeypatch, capsys):
    fake = FakeConfigfs(tmp_path / "tsm" / "report", monkeypatch)
    gateway = start_gateway(attestation_provider="tsm", attestation_tsm_path=fake.root)
    assert attest_verify(gateway.url, "--api-key", TEST_API_KEY) == 3
    out = capsys.readouterr().out
    assert out.startswith("NOT FULLY VERIFIED: ")
    assert "provider      tsm (sev_guest)" in out
    assert "passed user_data: the SEV-SNP report's REPORT_DATA field holds report_data" in out
    assert "NOT verified  hardware signature not verified: SEV-SNP report (AMD VCEK" in out
    assert len(fake.inblobs) == 1
    assert fake.entries() == []


def test_tsm_quote_from_an_unknown_backend_fails_verification(
    start_gateway, tmp_path, monkeypatch, capsys
):
    fake = FakeConfigfs(tmp_path / "tsm" / "report", monkeypatch, provider="arm_cca_guest")
    gateway = start_gateway(attestation_provider="tsm", attestation_tsm_path=fake.root)
    assert attest_verify(gateway.url, "--api-key", TEST_API_KEY) == 1
    assert capsys.readouterr().out.startswith(
        "FAIL: evidence_format: unknown TSM backend 'arm_cca_guest'"
    )


# --- TDX: the quote verified to Intel's root, then bound, then the policy -------------------

SAMPLES = Path(__file__).parents[1] / "unit" / "attestation" / "samples"
TDX_QUOTE = SAMPLES / "tdx_quote"
TDX_COLLATERAL = SAMPLES / "tdx_quote_collateral.json"
SAMPLE_TIME = "2025-07-01T00:00:00Z"
# The sample's measurements, as other parsers of this public sample also read them.
SAMPLE_MEASUREMENTS = {
    "mrtd": "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7",
    "rtmr0": "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c"
    "48aca29b220b80b6a540cf994b9bc9c0",
    "rtmr1": "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7"
    "aea8c323c173019b3093d54e579e9378",
    "rtmr2": "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3"
    "ba80b70870d7330733642e01d48c3132",
    "rtmr3": "00" * 48,
}


class TdxConfigfs(FakeConfigfs):
    """configfs-tsm of a TDX guest returning the real sample quote (bound to no nilai key)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(root, monkeypatch, provider="tdx_guest", auxblob=None)

    def _serve_quote(self, entry: Path) -> None:
        with (entry / "outblob").open("wb") as out:
            out.write(TDX_QUOTE.read_bytes())


def attest_verify_quote(*argv: str) -> int:
    """Run ``nilai attest verify-quote`` as the command line would."""
    parser = argparse.ArgumentParser(prog="nilai")
    attest.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["attest", "verify-quote", *argv])
    return args.handler(args)


def printed_measurements(out: str) -> dict[str, str]:
    found = re.findall(r"^    (MRTD|RTMR[0-3]) +([0-9a-f]{96})", out, re.MULTILINE)
    return {name.lower(): value for name, value in found}


def test_a_tdx_gateway_quote_is_verified_then_refused_for_its_binding(
    start_gateway, tmp_path, monkeypatch, capsys
):
    # The sample quote is genuine but bound to no nilai key: it must pass the quote checks and
    # fail the binding, which is checked on the verified body.
    fake = TdxConfigfs(tmp_path / "tsm" / "report", monkeypatch)
    gateway = start_gateway(attestation_provider="tsm", attestation_tsm_path=fake.root)
    argv = (gateway.url, "--api-key", TEST_API_KEY, "--at", SAMPLE_TIME)
    assert attest_verify(*argv, "--collateral", str(TDX_COLLATERAL)) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL: binding: the verified REPORTDATA is not SHA-256(public key ||")
    assert "passed tdx_quote: the TDX quote, QE report, PCK chain to Intel's SGX Root CA" in out
    assert printed_measurements(out) == SAMPLE_MEASUREMENTS
    assert "TCB status    UpToDate (advisories: none)" in out
    # No collateral from anywhere: a named failure, not a silent "unverified".
    assert attest_verify(*argv, "--offline") == 1
    assert capsys.readouterr().out.startswith("FAIL: collateral_missing: no collateral")


def test_a_tdx_gateway_attaches_its_collateral_for_offline_clients(
    start_gateway, tmp_path, monkeypatch, capsys
):
    fake = TdxConfigfs(tmp_path / "tsm" / "report", monkeypatch)
    gateway = start_gateway(
        attestation_provider="tsm",
        attestation_tsm_path=fake.root,
        attestation_collateral=TDX_COLLATERAL,
    )
    body = get_report(gateway, "00").json()
    assert json.loads(body["details"]["tdx_collateral"]) == json.loads(TDX_COLLATERAL.read_text())
    assert (
        attest_verify(gateway.url, "--api-key", TEST_API_KEY, "--at", SAMPLE_TIME, "--offline") == 1
    )
    out = capsys.readouterr().out
    assert "passed collateral: TDX collateral attached by the gateway" in out
    assert "passed tdx_quote" in out
    assert out.startswith("FAIL: binding: ")


def test_a_tdx_gateway_attaches_collateral_from_its_pccs_and_a_hint_when_it_is_down(
    start_gateway, tmp_path, monkeypatch, serve, capsys
):
    pccs = FakePccs(TDX_COLLATERAL.read_text())
    server = serve(pccs.app)
    fake = TdxConfigfs(tmp_path / "tsm" / "report", monkeypatch)
    gateway = start_gateway(
        attestation_provider="tsm", attestation_tsm_path=fake.root, attestation_pccs_url=server.url
    )
    details = get_report(gateway, "00").json()["details"]
    assert json.loads(details["tdx_collateral"]) == json.loads(TDX_COLLATERAL.read_text())
    assert details["tdx_pccs_url"] == server.url
    argv = (gateway.url, "--api-key", TEST_API_KEY, "--at", SAMPLE_TIME, "--offline")
    assert attest_verify(*argv) == 1
    assert "passed collateral: TDX collateral attached by the gateway" in capsys.readouterr().out

    down = FakePccs(TDX_COLLATERAL.read_text())
    down.fail_status = 503
    other = TdxConfigfs(tmp_path / "tsm2" / "report", monkeypatch)
    gateway = start_gateway(
        attestation_provider="tsm",
        attestation_tsm_path=other.root,
        attestation_pccs_url=serve(down.app).url,
    )
    response = get_report(gateway, "00")
    assert response.status_code == 200
    assert "tdx_collateral" not in response.json()["details"]
    assert response.json()["details"]["tdx_pccs_url"].startswith("http://127.0.0.1:")


def verified_with_status(status: str) -> TdxVerification:
    """What quote verification returns for a genuine quote on a platform of this TCB status."""
    return TdxVerification(
        tcb_status=status,
        advisory_ids=("INTEL-SA-00837",),
        report_data="00" * 64,
        **SAMPLE_MEASUREMENTS,
    )


@pytest.mark.parametrize("status", ["OutOfDate", "SWHardeningNeeded"])
def test_verify_quote_refuses_another_tcb_status_unless_allowed(capsys, monkeypatch, status):
    # The sample is UpToDate; what the CLI does with another status is a policy matter, so the
    # quote layer (tested on the real sample) is replaced by its result here.
    monkeypatch.setattr(
        verify_module, "verify_tdx_quote", lambda *_, **__: verified_with_status(status)
    )
    common = (str(TDX_QUOTE), "--collateral", str(TDX_COLLATERAL), "--at", SAMPLE_TIME)
    assert attest_verify_quote(*common) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAIL: tcb_status: TCB status {status} is not accepted")
    assert "INTEL-SA-00837" in out
    assert attest_verify_quote(*common, "--allow-tcb-status", status) == 3
    out = capsys.readouterr().out
    assert f"passed tcb_status: TCB status {status} is accepted" in out
    assert f"TCB status    {status} (advisories: INTEL-SA-00837)" in out


def test_verify_quote_prints_the_samples_measurements_and_exits_3_until_pinned(capsys, tmp_path):
    common = (str(TDX_QUOTE), "--collateral", str(TDX_COLLATERAL), "--at", SAMPLE_TIME)
    assert attest_verify_quote(*common) == 3
    out = capsys.readouterr().out
    assert out.startswith("NOT FULLY VERIFIED: the TDX quote verifies, but measurements not pinned")
    assert printed_measurements(out) == SAMPLE_MEASUREMENTS
    saved = json.loads(re.search(r"measurements JSON (.*)$", out, re.MULTILINE).group(1))
    assert saved == SAMPLE_MEASUREMENTS
    pinned = tmp_path / "measurements.json"
    pinned.write_text(json.dumps(saved))
    assert attest_verify_quote(*common, "--expect-measurements", str(pinned)) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: the TDX quote verifies to Intel's root and meets the policy.")
    assert "passed measurements: MRTD, RTMR0, RTMR1, RTMR2, RTMR3 match the pinned values" in out


@pytest.mark.parametrize("flag", ["--expect-mrtd", "--expect-rtmr2"])
def test_verify_quote_fails_for_a_wrong_expected_measurement(capsys, flag):
    common = (str(TDX_QUOTE), "--collateral", str(TDX_COLLATERAL), "--at", SAMPLE_TIME)
    assert attest_verify_quote(*common, flag, "ab" * 48) == 1
    name = flag.removeprefix("--expect-")
    assert capsys.readouterr().out.startswith(f"FAIL: measurement:{name}: {name.upper()} is ")


def test_verify_quote_fails_as_expired_after_next_update(capsys):
    common = (str(TDX_QUOTE), "--collateral", str(TDX_COLLATERAL))
    assert attest_verify_quote(*common, "--at", "2025-07-20T00:00:00Z") == 1
    assert capsys.readouterr().out.startswith("FAIL: collateral_expired: ")


def test_verify_quote_with_a_changed_bit_names_the_failed_check(capsys, tmp_path):
    quote = bytearray(TDX_QUOTE.read_bytes())
    quote[300] ^= 1
    changed = tmp_path / "quote"
    changed.write_bytes(bytes(quote))
    argv = (str(changed), "--collateral", str(TDX_COLLATERAL), "--at", SAMPLE_TIME)
    assert attest_verify_quote(*argv) == 1
    assert capsys.readouterr().out.startswith("FAIL: quote_signature: ")


def test_verify_quote_fetches_collateral_from_a_pccs(capsys, serve):
    pccs = FakePccs(TDX_COLLATERAL.read_text())
    server = serve(pccs.app)
    argv = (str(TDX_QUOTE), "--pccs-url", server.url, "--at", SAMPLE_TIME)
    assert attest_verify_quote(*argv) == 3
    assert "passed collateral: TDX collateral fetched" in capsys.readouterr().out
    assert "/tdx/certification/v4/tcb?fmspc=B0C06F000000" in pccs.requests
    pccs.fail_status = 503
    assert attest_verify_quote(*argv) == 1
    assert capsys.readouterr().out.startswith("FAIL: collateral_missing: cannot fetch collateral")


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (("--at", "yesterday"), "--at: 'yesterday' is not an ISO time"),
        (("--at", "2025-07-01T00:00:00"), "--at needs a timezone"),
        (("--expect-mrtd", "abcd"), "expected mrtd is not 48 bytes of hex"),
        (("--collateral", "/nonexistent/collateral.json"), "--collateral: cannot read"),
        (("--pccs-url", "ftp://pccs"), "--pccs-url must start with http"),
    ],
)
def test_verify_quote_usage_problems_are_2(capsys, argv, problem):
    assert attest_verify_quote(str(TDX_QUOTE), "--offline", *argv) == 2
    assert problem in capsys.readouterr().err


# --- rate limit ----------------------------------------------------------------------------


def test_attestation_reports_are_rate_limited_per_account(start_gateway):
    other_key = "second-test-key-0123456789"  # pragma: allowlist secret
    gateway = start_gateway(
        api_keys=[TEST_API_KEY, other_key],
        attestation_rate_limit_minute=3,
        rate_limit_minute=100,  # chat's own limit: attestation reports are counted apart
    )
    allowed = [get_report(gateway, "00") for _ in range(3)]
    assert [response.status_code for response in allowed] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining"] for r in allowed] == ["2", "1", "0"]
    assert allowed[0].headers["x-ratelimit-limit"] == "3"

    refused = get_report(gateway, "00")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "3 attestation reports per minute for this account" in error["message"]

    # Another account has its own budget, and chat budgets are not spent on reports.
    other = get_report(gateway, "00", headers={"Authorization": f"Bearer {other_key}"})
    assert other.status_code == 200


def test_attestation_reports_have_a_rate_limit_by_default(start_gateway):
    gateway = start_gateway()  # the default: 60 reports a minute per account
    statuses = [get_report(gateway, "00").status_code for _ in range(61)]
    assert statuses == [200] * 60 + [429]


def test_attestation_rate_limit_is_shared_by_replicas_through_redis(start_gateway, redis_prefix):
    shared = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix}
    replicas = [start_gateway(attestation_rate_limit_minute=3, **shared) for _ in range(2)]
    statuses = [get_report(replicas[i % 2], "00").status_code for i in range(4)]
    assert statuses == [200, 200, 200, 429]


def test_attestation_rate_limit_zero_switches_it_off(start_gateway):
    gateway = start_gateway(attestation_rate_limit_minute=0)
    responses = [get_report(gateway, "00") for _ in range(5)]
    assert [response.status_code for response in responses] == [200] * 5
    assert "x-ratelimit-limit" not in responses[0].headers


async def test_gateway_refuses_to_start_with_http_provider_and_no_url(tmp_path):
    from nilai.gateway.lifespan import build_services
    from nilai.gateway.metrics import Metrics
    from nilai.settings import NilaiSettings

    settings = NilaiSettings(data_dir=tmp_path, attestation_provider="http")
    with pytest.raises(ValueError, match="needs NILAI_ATTESTATION_URL"):
        async with build_services(settings, Metrics()):
            pass
