"""The operator contract: `nilai api`, `nilai announce` and `nilai verify` as commands."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from openai._streaming import SSEDecoder

from nilai.cli import main
from tests.conftest import REDIS_URL, TEST_API_KEY
from tests.support.servers import free_port, stop_process, wait_until

pytestmark = pytest.mark.e2e

NILAI = str(Path(sys.executable).parent / "nilai")
MESSAGES = [{"role": "user", "content": "hi"}]


def record(gateway, tmp_path: Path, *, stream: bool) -> tuple[Path, Path]:
    body = {"model": "fake-model", "messages": MESSAGES, "stream": stream}
    request = httpx.Request("POST", f"{gateway.url}/v1/chat/completions", json=body)
    request.headers.update(gateway.auth)
    with httpx.Client() as client:
        response = client.send(request)
    assert response.status_code == 200
    saved = tmp_path / ("stream.sse" if stream else "response.json")
    saved.write_bytes(response.content)
    sent = tmp_path / "request.json"
    sent.write_bytes(request.content)
    return saved, sent


def flip(path: Path, needle: bytes) -> None:
    data = path.read_bytes()
    index = data.index(needle)
    path.write_bytes(data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :])


@pytest.mark.parametrize("stream", [False, True])
def test_verify_accepts_answers_and_rejects_any_changed_byte(
    start_fake, start_gateway, tmp_path, capsys, stream
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url])
    saved, sent = record(gateway, tmp_path, stream=stream)
    assert main(["verify", str(saved), "--gateway", gateway.url, "--request", str(sent)]) == 0
    assert capsys.readouterr().out.startswith("OK:")

    key = httpx.get(f"{gateway.url}/v1/public_key").json()
    for needle in (b"w3", b"says", b"fake-model"):
        tampered = tmp_path / f"tampered-{needle.decode()}"
        tampered.write_bytes(saved.read_bytes())
        flip(tampered, needle)
        assert main(["verify", str(tampered), "--public-key", key]) == 1
        assert capsys.readouterr().out.startswith("FAIL:")

    other = tmp_path / "other-request.json"
    other.write_bytes(sent.read_bytes().replace(b"hi", b"ho"))
    assert main(["verify", str(saved), "--public-key", key, "--request", str(other)]) == 1


def test_verify_command_runs_as_a_program(start_fake, start_gateway, tmp_path):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url])
    saved, _ = record(gateway, tmp_path, stream=True)
    ok = subprocess.run(
        [NILAI, "verify", str(saved), "--gateway", gateway.url],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    flip(saved, b"w5")
    bad = subprocess.run(
        [NILAI, "verify", str(saved), "--gateway", gateway.url],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout


def test_verify_fails_a_recorded_stream_with_an_event_injected_after_a_cr(
    start_fake, start_gateway, tmp_path, capsys
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url])
    saved, sent = record(gateway, tmp_path, stream=True)
    verify = ["verify", "--gateway", gateway.url, "--request", str(sent)]
    assert main([*verify, str(saved)]) == 0
    assert capsys.readouterr().out.startswith("OK: stream signature valid")

    events = saved.read_bytes().split(b"\n\n")
    chunk = json.loads(events[2].removeprefix(b"data: "))
    chunk["choices"][0]["delta"]["content"] = "INJECTED "
    injected = b": keep-alive\rdata: " + json.dumps(chunk).encode()
    tampered = tmp_path / "injected.sse"
    tampered.write_bytes(b"\n\n".join([*events[:2], injected, *events[2:]]))
    # The openai SDK splits lines at CR, as the SSE specification says, and shows the words.
    seen = [sse.data for sse in SSEDecoder().iter_bytes(iter([tampered.read_bytes()]))]
    assert any("INJECTED" in data for data in seen)
    assert main([*verify, str(tampered)]) == 1
    assert capsys.readouterr().out.startswith("FAIL:")


def test_verify_fails_an_answer_or_attestation_document_passed_off_as_another_kind(
    start_fake, start_gateway, tmp_path, capsys
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url])
    saved, sent = record(gateway, tmp_path, stream=False)
    verify = ["verify", "--gateway", gateway.url]
    assert main([*verify, "--request", str(sent), str(saved)]) == 0
    assert capsys.readouterr().out.startswith("OK: response signature valid")

    # The answer's signed bytes, re-framed as a one-event stream.
    reframed = tmp_path / "reframed.sse"
    reframed.write_bytes(b"data: " + saved.read_bytes() + b"\n\ndata: [DONE]\n\n")
    assert main([*verify, "--request", str(sent), str(reframed)]) == 1
    assert "is not a chat.completion.chunk" in capsys.readouterr().out

    # A simulated attestation document, signed by the same key, as a stream and as an answer.
    report = httpx.get(
        f"{gateway.url}/v1/attestation/report",
        params={"nonce": "00" * 16},
        headers=gateway.auth,
        timeout=10,
    ).json()
    document: str = report["cpu_attestation"]
    format_line = json.loads(document)["format"].encode()
    forms = {
        "document.sse": b"data: " + format_line + b"\n\ndata: " + document.encode() + b"\n\n",
        "document.json": document.encode(),
    }
    for name, content in forms.items():
        forged = tmp_path / name
        forged.write_bytes(content)
        assert main([*verify, str(forged)]) == 1
        assert capsys.readouterr().out.startswith("FAIL:")


def test_verify_reports_unreachable_gateway(tmp_path, capsys):
    saved = tmp_path / "x.json"
    saved.write_text("{}")
    assert main(["verify", str(saved), "--gateway", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot get the public key" in capsys.readouterr().out


def test_verify_names_a_missing_file_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nofile.json"
    assert main(["verify", str(missing), "--public-key", "unused"]) == 2
    out = capsys.readouterr().out
    assert out == f"FAIL: cannot read {missing}: No such file or directory\n"


def test_worker_local_says_a_mistyped_model_directory_does_not_exist(tmp_path, capsys):
    typo = tmp_path / "typo"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:  # the command sets up logging onto this test's captured stderr: undo that after
        assert main(["worker", "local", "--model", str(typo)]) == 2
    finally:
        root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err
    assert f"model directory {typo} does not exist" in err
    assert "network access" in err
    assert "Traceback" not in err


def test_announce_needs_redis(capsys, monkeypatch):
    monkeypatch.delenv("NILAI_REDIS_URL", raising=False)
    assert main(["announce", "--url", "http://127.0.0.1:1"]) == 2
    assert "NILAI_REDIS_URL" in capsys.readouterr().err
    assert main(["announce", "--url", "ftp://nope"]) == 2


def test_api_rejects_invalid_settings(capsys, monkeypatch):
    monkeypatch.setenv("NILAI_AUTH_STRATEGIES", "telepathy")
    assert main(["api"]) == 2
    assert "auth_strategies" in capsys.readouterr().err


@pytest.mark.integration
def test_api_and_announce_processes(start_fake, tmp_path, redis_prefix):
    fake = start_fake(name="proc")
    port = free_port()
    env = {
        **os.environ,
        "NILAI_REDIS_URL": REDIS_URL,
        "NILAI_REDIS_PREFIX": redis_prefix,
        "NILAI_API_KEY": TEST_API_KEY,
        "NILAI_DATA_DIR": str(tmp_path / "data"),
        "NILAI_DISCOVERY_REFRESH_S": "0.2",
        "NILAI_DISCOVERY_TTL_S": "3",
    }
    api = subprocess.Popen([NILAI, "api", "--port", str(port)], env=env)
    announce = subprocess.Popen([NILAI, "announce", "--url", fake.url], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TEST_API_KEY, max_retries=0)

        def served() -> bool:
            try:
                return [m.id for m in client.models.list()] == ["fake-model"]
            except openai.APIConnectionError:
                return False

        wait_until(served, timeout_s=20)
        reply = client.chat.completions.create(model="fake-model", messages=MESSAGES)
        assert reply.choices[0].message.content.startswith("proc says:")

        announce.send_signal(signal.SIGTERM)
        assert announce.wait(timeout=10) == 0
        wait_until(lambda: list(client.models.list()) == [], timeout_s=5)
    finally:
        for process in (announce, api):
            stop_process(process)
    # uvicorn re-raises SIGTERM after a clean shutdown
    assert api.returncode in (0, -signal.SIGTERM)
