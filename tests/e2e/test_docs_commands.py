"""Every shell command shown in README.md and docs/ runs, here or in a named test or CI step.

The commands are read from the ``sh``/``bash`` blocks of the documents themselves, so an edited
or added command is checked the next time the tests run: it either runs below (against a
gateway and fake model server on free ports, which replace the documented ones), or appears in
``ELSEWHERE`` with the test or CI step that runs it. A command that is neither fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FakeHandle, GatewayHandle

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
API_KEY = "demo-key-123"  # pragma: allowlist secret

# Commands that cannot run inside this test, and what runs them instead.
ELSEWHERE: dict[str, str] = {
    "make serve": "tests/e2e/test_serve.py runs `nilai serve`, the whole of the make target",
    "NILAI_MODEL=Qwen/Qwen2.5-0.5B-Instruct make serve": (
        "tests/e2e/test_serve.py (the hub model itself cannot be downloaded here; serving a "
        "model directory is tests/e2e/test_local_worker.py)"
    ),
    "make test": ".ci/run, step 'Tests (make test)'",
    "make bench-quick": ".ci/run, step 'Benchmark baseline (make bench-quick)'",
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

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def document_commands(path: Path) -> Iterator[Command]:
    """The commands of a document's shell blocks: continuations joined, comments dropped."""
    in_block = False
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.startswith("```"):
            in_block = raw.strip() in ("```sh", "```bash", "```shell")
            continue
        if not in_block:
            continue
        line = re.sub(r"\s+#\s.*$", "", raw).rstrip()
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = number
        pending.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            yield Command(path, start, " ".join(pending))
            pending = []


def all_commands() -> list[Command]:
    return [command for path in DOCUMENTS for command in document_commands(path)]


def runnable(command: Command) -> bool:
    """Whether the tests below run ``command`` themselves."""
    if command.text in ELSEWHERE:
        return False
    words = shlex.split(command.text.replace(".venv/bin/", ""))
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # leading VAR=value assignments
    return bool(words) and words[0] in ("curl", "nilai", "echo", "export")


def test_every_documented_command_is_exercised():
    commands = all_commands()
    assert len(commands) > 30  # the parser found the blocks
    orphans = [str(c) for c in commands if c.text not in ELSEWHERE and not runnable(c)]
    assert orphans == [], "commands no test runs:\n" + "\n".join(orphans)
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
    return start_gateway(upstream_urls=[fake.url], api_keys=[API_KEY], rate_limit_minute=100)


def test_api_guide_commands_run(api_gateway: GatewayHandle, tmp_path: Path):
    port = api_gateway.url.rsplit(":", 1)[1]
    commands = [c for c in document_commands(ROOT / "docs" / "API.md") if runnable(c)]
    assert len(commands) >= 15
    env = shell_env(NILAI_API_KEY=API_KEY)
    outputs = [run(c.text, cwd=tmp_path, env=env, ports={"18080": port}) for c in commands]
    assert all(out.strip() for c, out in zip(commands, outputs, strict=True) if ">" not in c.text)
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
