"""`nilai serve`: one command, gateway + worker, signed answers, nothing left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from nilai.crypto.verify import verify_any, verify_response
from tests.support.servers import free_port, wait_until

pytestmark = pytest.mark.e2e

NILAI = str(Path(sys.executable).parent / "nilai")
REPO_ROOT = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any NILAI_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NILAI_")}
    env.update(extra)
    return env


class Serve:
    """A `nilai serve` process in its own process group, as a terminal would run it."""

    def __init__(self, data_dir: Path, port: int) -> None:
        # TMPDIR: the banner's commands save the answer there, not in the shared /tmp.
        env = clean_env(NILAI_DATA_DIR=str(data_dir), NILAI_PORT=str(port), TMPDIR=str(data_dir))
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [NILAI, "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, "".join(self.lines)
            try:
                return httpx.get(f"{self.url}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=120, interval_s=0.25)
        wait_until(lambda: any("Press Ctrl-C" in line for line in self.lines))

    def printed_commands(self) -> list[str]:
        """The shell commands of the banner: the lines after each "...:" heading."""
        banner = "".join(self.lines).split(f"nilai is serving at {self.url}", 1)[1]
        paragraphs = banner.split("\n\n")
        return [p.split("\n", 1)[1] for p in paragraphs if p.split("\n", 1)[0].endswith(":")]

    def printed_key(self) -> str | None:
        for line in self.lines:
            if "API key (shown once" in line:
                return line.split()[-1]
        return None

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()


def run_printed_commands(serve: Serve, **env: str) -> list[str]:
    """Paste each command of the banner into a shell at the repository root; their outputs.

    The three commands are: curl (saving the answer), `nilai verify` of it, the openai SDK.
    """
    outputs: list[str] = []
    for command in serve.printed_commands():
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=REPO_ROOT,
            env=clean_env(**env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        outputs.append(done.stdout)
    return outputs


def assert_printed_commands_work(serve: Serve, **env: str) -> None:
    answer, verified, sdk = run_printed_commands(serve, **env)
    assert '"choices"' in answer
    assert verified.startswith("OK: response signature valid"), verified
    # The SDK program got its answer and printed it (exit 0 is checked above; a 401 would have
    # raised). The tiny model's noise may be only whitespace, so the text itself is not checked.
    assert sdk.endswith("\n")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_serve_answers_signed_and_ctrl_c_leaves_nothing(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data_dir / "tiny-model")  # skip regenerating it
    serve = Serve(data_dir, free_port())
    try:
        serve.wait_ready()
        key = serve.printed_key()
        assert key is not None
        output = "".join(serve.lines)
        assert f"curl -s {serve.url}/v1/chat/completions" in output
        assert "random weights" in output
        # The gateway registers the worker in-process and says so; the worker says nothing else.
        assert "Not announced" not in output
        assert output.count(" serving tiny-model") == 1
        assert_printed_commands_work(serve)

        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=16
        )
        assert raw.parse().choices[0].message.content
        public_key = httpx.get(f"{serve.url}/v1/public_key").json()
        verify_response(raw.http_response.content, public_key)
        stream = client.chat.completions.create(
            model="tiny-model",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            stream=True,
        )
        assert sum(1 for chunk in stream if chunk.choices) >= 2
        # The Responses API too, end to end on the built-in worker, plain and streamed.
        answer = client.responses.with_raw_response.create(
            model="tiny-model", input="Hi", max_output_tokens=8
        )
        assert answer.parse().output_text
        verify_any(answer.http_response.content, public_key)
        with client.responses.with_streaming_response.create(
            model="tiny-model", input="Hi", max_output_tokens=8, stream=True
        ) as streamed:
            recorded = streamed.read()
        assert verify_any(recorded, public_key).kind == "responses stream"

        workers = serve.children()
        assert len(workers) == 1
        os.killpg(serve.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert serve.process.wait(timeout=20) in (0, -signal.SIGINT, 130)
        wait_until(lambda: not alive(workers[0]), timeout_s=10)
    finally:
        serve.stop()

    # Second start: the key is not shown again, the first one still works.
    again = Serve(data_dir, free_port())
    try:
        again.wait_ready()
        assert again.printed_key() is None
        assert "only its hash is kept" in "".join(again.lines)
        # The commands read the key from $NILAI_API_KEY now, in the shell and in Python alike.
        assert_printed_commands_work(again, NILAI_API_KEY=key)
        response = httpx.get(f"{again.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
        # Even a SIGKILL of serve must not leave the worker running.
        [worker] = again.children()
        os.kill(again.process.pid, signal.SIGKILL)
        again.process.wait()
        wait_until(lambda: not alive(worker), timeout_s=10)
    finally:
        again.stop()


def test_serve_on_a_busy_port_exits_2_with_how_to_pick_another_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [NILAI, "serve"],
            env=clean_env(NILAI_DATA_DIR=str(tmp_path), NILAI_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"nilai serve: cannot listen on 127.0.0.1:{port} (is already in use); pick another "
        f"port with --port {port + 1} or NILAI_PORT={port + 1} make serve"
    )
    assert "serving at" not in done.stdout
    assert not (tmp_path / "tiny-model").exists()  # nothing was loaded or generated
