"""Every shell command shown in README.md and docs/ runs, here or in a named test or CI step.

The commands are read from the ``sh``/``bash`` blocks of the documents themselves, so an edited
or added command is checked the next time the tests run: it either runs below (against a
gateway and fake model server on free ports, which replace the documented ones), or appears in
``ELSEWHERE`` with the test or CI step that runs it. A command that is neither fails the test.
A block marked with ``SCRIPT_MARK`` on the line above it is a recipe meant to be pasted whole:
it runs as one script (test_production_recipe_runs), not command by command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from nilai.crypto.verify import verify_response
from tests.conftest import FakeHandle, GatewayHandle
from tests.support.servers import free_port, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
ADMIN_TOKEN = "demo-admin-token"  # pragma: allowlist secret
API_KEY = "demo-key-123"  # pragma: allowlist secret
SCRIPT_MARK = "<!-- docs-commands: one script"

# Commands that cannot run inside this test, and what runs them instead.
ELSEWHERE: dict[str, str] = {
    "make serve": "tests/e2e/test_serve.py runs `nilai serve`, the whole of the make target",
    "NILAI_MODEL=Qwen/Qwen2.5-0.5B-Instruct make serve": (
        "tests/e2e/test_serve.py (the hub model itself cannot be downloaded here; serving a "
        "model directory is tests/e2e/test_local_worker.py)"
    ),
    "make test": ".ci/run, step 'Tests (make test)'",
    "make bench-quick": ".ci/run, step 'Benchmark baseline (make bench-quick)'",
    "make bench-load-quick": (
        "test_load_benchmark_runs_quick_mode below (bench/load.py --quick, one scenario; the "
        "whole quick mode takes about a minute)"
    ),
    "make bench": (
        "its two halves: .ci/run 'Benchmark baseline' (the micro benchmarks) and "
        "test_load_benchmark_runs_quick_mode below (bench/load.py)"
    ),
    # The API guide's recorded run starts these two; `api_gateway` starts the same programs.
    "PYTHONPATH=. .venv/bin/python -m tests.fakes.fake_openai_server --port 18001 &": (
        "the api_gateway fixture below"
    ),
    "NILAI_DATA_DIR=/tmp/apidoc NILAI_API_KEY=demo-key-123 "
    "NILAI_UPSTREAM_URLS=http://127.0.0.1:18001 .venv/bin/nilai api --port 18080 &": (
        "the api_gateway fixture below"
    ),
}

# Documented commands that exit non-zero on purpose, with the status and first word the
# documents promise: `nilai attest verify` against the simulated provider says the report is
# bound but SIMULATED, and exits 4 so no script mistakes it for verified hardware.
EXPECTED_OUTCOME: dict[str, tuple[int, str]] = {"nilai attest verify": (4, "SIMULATED:")}


def expected_outcome(text: str) -> tuple[int, str]:
    """The exit status and output start a documented verify command must show."""
    for command, outcome in EXPECTED_OUTCOME.items():
        if command in text:
            return outcome
    return 0, "OK"


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str
    script: bool = False  # part of a block that runs as one script

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def document_commands(path: Path) -> Iterator[Command]:
    """The commands of a document's shell blocks: continuations joined, comments dropped."""
    in_block = script = False
    pending: list[str] = []
    start = 0
    previous = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.startswith("```"):
            in_block = raw.strip() in ("```sh", "```bash", "```shell")
            script = in_block and previous.startswith(SCRIPT_MARK)
            continue
        previous = raw
        if not in_block:
            continue
        line = re.sub(r"\s+#\s.*$", "", raw).rstrip()
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = number
        pending.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            yield Command(path, start, " ".join(pending), script)
            pending = []


def all_commands() -> list[Command]:
    return [command for path in DOCUMENTS for command in document_commands(path)]


def runnable(command: Command) -> bool:
    """Whether the tests below run ``command`` themselves."""
    if command.text in ELSEWHERE or command.script:
        return False
    words = shlex.split(command.text.replace(".venv/bin/", ""))
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # leading VAR=value assignments
    return bool(words) and words[0] in ("curl", "nilai", "echo", "export")


def test_every_documented_command_is_exercised():
    commands = all_commands()
    assert len(commands) > 30  # the parser found the blocks
    orphans = [
        str(c) for c in commands if c.text not in ELSEWHERE and not c.script and not runnable(c)
    ]
    assert orphans == [], "commands no test runs:\n" + "\n".join(orphans)
    scripts = [c for c in commands if c.script]
    assert scripts, f"no block marked {SCRIPT_MARK!r}"
    assert {c.path for c in scripts} == {ROOT / "README.md"}  # run by the test below
    for where in ELSEWHERE.values():
        for path in re.findall(r"(?:tests|\.ci)/[\w/.]+", where):
            assert (ROOT / path).exists(), path


# --- running them ----------------------------------------------------------------------------


def run(text: str, *, cwd: Path, env: dict[str, str], ports: dict[str, str]) -> str:
    """Run one documented command under bash with the test's ports; its stdout."""
    for documented, actual in ports.items():
        text = text.replace(documented, actual)
    text = text.replace(".venv/bin/", f"{BIN}/")
    status, _ = expected_outcome(text)
    done = subprocess.run(
        ["/bin/bash", "-c", text],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == status, (
        f"{text}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def shell_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **extra}


@pytest.fixture
def api_gateway(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
) -> GatewayHandle:
    """The API guide's set-up: the fake model server and a gateway with key demo-key-123."""
    fake = start_fake()
    return start_gateway(
        upstream_urls=[fake.url],
        api_keys=[API_KEY],
        rate_limit_minute=100,
        admin_token=ADMIN_TOKEN,
    )


def test_api_guide_commands_run(api_gateway: GatewayHandle, tmp_path: Path):
    port = api_gateway.url.rsplit(":", 1)[1]
    commands = [c for c in document_commands(ROOT / "docs" / "API.md") if runnable(c)]
    assert len(commands) >= 15
    env = shell_env(NILAI_API_KEY=API_KEY, NILAI_ADMIN_TOKEN=ADMIN_TOKEN)
    outputs = [run(c.text, cwd=tmp_path, env=env, ports={"18080": port}) for c in commands]
    assert all(out.strip() for c, out in zip(commands, outputs, strict=True) if ">" not in c.text)
    # The admin calls are made with the admin token: a price set, then the default again.
    answers = dict(zip((c.text for c in commands), outputs, strict=True))
    (put,) = [out for text, out in answers.items() if "-X PUT" in text]
    (delete,) = [out for text, out in answers.items() if "-X DELETE" in text]
    assert '"default":false' in put
    assert '"default":true' in delete
    verified = [(c, out) for c, out in zip(commands, outputs, strict=True) if "verify" in c.text]
    assert verified
    for command, out in verified:
        assert out.startswith(expected_outcome(command.text)[1]), out


def test_readme_commands_run(start_fake: Callable[..., FakeHandle], start_gateway, tmp_path: Path):
    fake = start_fake(models=["tiny-model"])
    data = tmp_path / "data"
    gateway = start_gateway(upstream_urls=[fake.url], data_dir=data, api_keys=[API_KEY])
    port = gateway.url.rsplit(":", 1)[1]
    env = shell_env(NILAI_DATA_DIR=str(data), NILAI_API_KEY=API_KEY)
    key_id = ""
    for command in document_commands(ROOT / "README.md"):
        if not runnable(command):
            continue
        text = command.text.replace("<key id or prefix>", key_id)
        text = text.replace("<the key make serve printed>", API_KEY)
        out = run(text, cwd=tmp_path, env=env, ports={"8080": port})
        if text.startswith("nilai keys create"):
            key_id = re.search(r"\b(key_\w+)", out).group(1)  # type: ignore[union-attr]
        if "nilai verify" in text or "nilai attest verify" in text:
            assert out.startswith(expected_outcome(text)[1]), out
    assert key_id


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_production_recipe_runs(pg_database: str, redis_prefix: str, tmp_path: Path):
    """The README's PostgreSQL + Redis recipe, pasted whole: a signed chat and its usage.

    Only what makes it private changes: its own database and Redis key prefix, free ports,
    a data directory under ``tmp_path``, and this virtualenv instead of ``.venv``.
    """
    script = "\n".join(c.text for c in document_commands(ROOT / "README.md") if c.script)
    assert "nilai api" in script
    assert "/v1/usage" in script
    api_port, worker_port = free_port(), free_port()
    replacements = {
        "127.0.0.1:5432/nilai": f"127.0.0.1:5432/{pg_database}",
        '"$HOME/nilai-prod"': str(tmp_path / "data"),
        ".venv/bin/": f"{BIN}/",
    }
    for documented, actual in replacements.items():
        assert documented in script, documented
        script = script.replace(documented, actual)
    script = re.sub(r"\b8080\b", str(api_port), script)
    script = re.sub(r"\b8000\b", str(worker_port), script)
    env = shell_env(NILAI_REDIS_PREFIX=redis_prefix, TMPDIR=str(tmp_path))
    for name in ("NILAI_API_KEY", "NILAI_DATABASE_URL", "NILAI_UPSTREAM_URLS", "NILAI_CONFIG_FILE"):
        env.pop(name, None)
    # Files, not pipes: the worker and the gateway keep running after the script ends.
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("w") as out_file, stderr.open("w") as err_file:
        shell = subprocess.Popen(
            ["/bin/bash", "-e", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=out_file,
            stderr=err_file,
            start_new_session=True,  # the background worker and gateway share its group
        )
    try:
        status = shell.wait(timeout=240)
        out = stdout.read_text()
        assert status == 0, f"exit {status}\n{out}\n{stderr.read_text()[-4000:]}"
        answer = (tmp_path / "nilai-answer.json").read_bytes()
        assert json.loads(answer)["model"] == "tiny-model"
        key = httpx.get(f"http://127.0.0.1:{api_port}/v1/public_key", timeout=30).json()
        verify_response(answer, key)
        lines = out.splitlines()
        assert any(line.startswith("OK: response signature valid") for line in lines), out
        usage = json.loads(lines[-1])
        assert usage["queries"] == 1, usage
        assert usage["total_tokens"] == json.loads(answer)["usage"]["total_tokens"], usage
    finally:
        if shell.poll() is None:
            shell.kill()
        shell.wait()
        if group_alive(shell.pid):
            os.killpg(shell.pid, signal.SIGTERM)
        try:
            wait_until(lambda: not group_alive(shell.pid), timeout_s=30, what="the recipe's exit")
        finally:
            if group_alive(shell.pid):
                os.killpg(shell.pid, signal.SIGKILL)


def test_vllm_guide_commands_build_the_launch_command(tmp_path: Path):
    """GPU commands run with ``--dry-run``: their flags parse and build a `vllm serve` line."""
    env = shell_env()
    ran = 0
    for command in document_commands(ROOT / "docs" / "VLLM_TUNING.md"):
        text = command.text
        if text.startswith("export "):
            name, _, value = text.removeprefix("export ").partition("=")
            env[name] = value
            continue
        head, sep, tail = text.partition(" -- ")
        dry = f"{head} --dry-run{sep}{tail}" if "--dry-run" not in head else text
        out = run(dry, cwd=tmp_path, env=env, ports={})
        assert out.startswith("vllm serve "), out
        ran += 1
    assert ran >= 3


def test_load_benchmark_runs_quick_mode(tmp_path: Path):
    """`make bench`'s load half, briefly: one scenario, the table and the chart written."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "load.py"),
            "--quick",
            "--only",
            "plain-c1",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "load.md").read_text()
    assert "| non-streaming, c=1 | gateway |" in table
    assert (tmp_path / "load.png").stat().st_size > 10_000
