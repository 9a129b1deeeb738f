"""`nilai worker vllm` against a stand-in `vllm` executable: launch, health, announce, stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from redis.asyncio import Redis

from nilai.discovery.base import EndpointRecord
from nilai.discovery.redis import RedisDiscovery
from nilai.settings import NilaiSettings
from nilai.workers.vllm_launcher import (
    LaunchOptions,
    build_command,
    plan_worker,
    run_worker,
    supervise,
)
from tests.conftest import REDIS_URL
from tests.support.servers import free_port, wait_until

pytestmark = pytest.mark.e2e

# A stand-in for `vllm`: parses `serve MODEL --host H --port P ...`, records its argv and pid next
# to itself, then behaves as MODE says: "serve" answers /health and /v1/models until SIGTERM,
# "exit" fails at once, "hang" never answers, "brief" serves for a moment and exits by itself.
STAND_IN = """\
#!{python}
import argparse, json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODE = {mode!r}
parser = argparse.ArgumentParser()
parser.add_argument("command", choices=["serve"])
parser.add_argument("model")
parser.add_argument("--host", required=True)
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--served-model-name")
args, _ = parser.parse_known_args()
record = {{"argv": sys.argv[1:], "pid": os.getpid(), "nilai_vars": sorted(
    name for name in os.environ if name.startswith("NILAI_") or name == "VLLM_MAX_NUM_SEQS")}}
Path(__file__).with_suffix(".json").write_text(json.dumps(record))
if MODE == "exit":
    print("stand-in: out of GPU memory", file=sys.stderr)
    sys.exit(3)
if MODE == "hang":
    signal.pause()
name = args.served_model_name or args.model
models = {{"object": "list", "data": [{{"id": name, "object": "model", "max_model_len": 4096}}]}}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = {{"/health": b"", "/v1/models": json.dumps(models).encode()}}.get(self.path)
        self.send_response(404 if body is None else 200)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


def stop(*_):
    raise SystemExit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
server = ThreadingHTTPServer((args.host, args.port), Handler)
if MODE == "brief":
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
try:
    server.serve_forever(poll_interval=0.05)
finally:
    server.server_close()
"""

# `nilai worker vllm` until the CLI group exists: the subcommand on a parser of its own.
LAUNCHER = """\
import argparse, sys
from nilai.cli import worker_vllm
parser = argparse.ArgumentParser(prog="nilai worker")
worker_vllm.register(parser.add_subparsers(required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def stand_in(tmp_path: Path, mode: str = "serve") -> Path:
    path = tmp_path / f"vllm-{mode}"
    path.write_text(STAND_IN.format(python=sys.executable, mode=mode))
    path.chmod(0o755)
    return path


def recorded(script: Path) -> dict:
    record = script.with_suffix(".json")
    wait_until(record.exists, timeout_s=10)
    return json.loads(record.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def listed(prefix: str) -> list[EndpointRecord]:
    async def read() -> list[EndpointRecord]:
        redis = Redis.from_url(REDIS_URL)
        try:
            return await RedisDiscovery(redis, prefix).list()
        finally:
            await redis.aclose()

    return asyncio.run(read())


def launch(script: Path, port: int, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", LAUNCHER, "vllm", "--model", "org/model", "--port", str(port)]
    return subprocess.Popen(
        [*command, "--vllm-bin", str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NILAI_", "VLLM_"))}


@pytest.mark.integration
def test_launcher_announces_and_sigterm_stops_and_withdraws(tmp_path, redis_prefix):
    script, port = stand_in(tmp_path), free_port()
    env = base_env() | {
        "NILAI_REDIS_URL": REDIS_URL,
        "NILAI_REDIS_PREFIX": redis_prefix,
        "NILAI_DISCOVERY_TTL_S": "3",
        "VLLM_MAX_NUM_SEQS": "8",
        "VLLM_ENFORCE_EAGER": "yes",
    }
    extra = ["--served-model-name", "stand-in", "--", "--max-model-len", "4096"]
    launcher = launch(script, port, *extra, env=env)
    try:
        records = wait_until(lambda: listed(redis_prefix), timeout_s=15)
        url = f"http://127.0.0.1:{port}"
        assert [(r.url, [m.id for m in r.models]) for r in records] == [(url, ["stand-in"])]
        assert records[0].models[0].max_model_len == 4096
        seen = recorded(script)
        options = LaunchOptions(
            model="org/model",
            port=port,
            served_model_name="stand-in",
            extra_args=("--max-model-len", "4096"),
        )
        assert seen["argv"] == build_command(env, options)[1:]
        assert seen["argv"][-3:] == ["--enforce-eager", "--max-model-len", "4096"]
        assert seen["nilai_vars"] == []  # neither secrets nor consumed knobs reach vllm
        assert alive(seen["pid"])

        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=15)
        assert launcher.returncode == 0, err
        assert not alive(seen["pid"])
        assert listed(redis_prefix) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()


def test_launcher_fails_clearly_when_vllm_exits_early(tmp_path):
    script = stand_in(tmp_path, "exit")
    launcher = launch(script, free_port(), env=base_env())
    _, err = launcher.communicate(timeout=15)
    assert launcher.returncode == 3
    assert "stand-in: out of GPU memory" in err
    assert "vllm exited with code 3 before" in err
    assert "/health" in err


# The same paths in this process, so that coverage sees the supervisor.


def test_health_timeout_stops_the_server(tmp_path):
    script = stand_in(tmp_path, "hang")
    options = LaunchOptions(model="m", port=free_port(), vllm_bin=str(script))
    plan = plan_worker(base_env(), options, health_timeout_s=0.5, grace_s=0.5)
    messages: list[str] = []
    assert asyncio.run(supervise(plan, report=messages.append)) == 1
    assert any("did not answer 200 within 0.5s" in m for m in messages), messages
    assert not alive(recorded(script)["pid"])


def test_server_that_exits_by_itself_without_redis(tmp_path):
    script = stand_in(tmp_path, "brief")
    options = LaunchOptions(model="m", port=free_port(), vllm_bin=str(script))
    plan = plan_worker(base_env(), options)
    messages: list[str] = []
    assert run_worker(plan, NilaiSettings(redis_url=None), messages.append) == 0
    assert "NILAI_UPSTREAM_URLS=http://127.0.0.1:" in messages[0]
    assert any("ready" in m for m in messages)
    assert any("vllm exited with code 0" in m for m in messages)


@pytest.mark.integration
def test_sigint_withdraws_and_stops_the_server(tmp_path, redis_prefix):
    script = stand_in(tmp_path)
    options = LaunchOptions(model="m", port=free_port(), vllm_bin=str(script))
    plan = plan_worker(base_env(), options)
    settings = NilaiSettings(redis_url=REDIS_URL, redis_prefix=redis_prefix, discovery_ttl_s=3.0)
    announced: list[list[EndpointRecord]] = []

    def interrupt_once_announced() -> None:
        announced.append(wait_until(lambda: listed(redis_prefix), timeout_s=15))
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's handler takes it, not pytest

    helper = threading.Thread(target=interrupt_once_announced)
    helper.start()
    try:
        messages: list[str] = []
        assert run_worker(plan, settings, messages.append) == 0
    finally:
        helper.join(timeout=20)
    assert [r.url for r in announced[0]] == [plan.announce_url]
    assert listed(redis_prefix) == []
    assert not alive(recorded(script)["pid"])
    assert not any("exited" in m for m in messages), messages
