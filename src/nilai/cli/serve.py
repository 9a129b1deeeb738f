"""``nilai serve``: the embedded all-in-one — gateway plus a local worker, nothing else needed.

The worker runs as a child process (torch never loads into the gateway, and generation never
competes with the gateway's event loop); discovery and state stay in-process.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from nilai.cli.common import fail, load_settings
from nilai.gateway.app import create_app
from nilai.gateway.server import run_server
from nilai.logging import configure_logging
from nilai.settings import NilaiSettings
from nilai.workers.local.engine import default_model_id

KEY_HASH_FILE = "serve_api_key.sha256"
WORKER_START_TIMEOUT_S = 600.0
GATEWAY_START_TIMEOUT_S = 60.0
PASTABLE_KEY = re.compile(r"[A-Za-z0-9._~+/=-]+")
"""Keys printed into the examples as they are: no character a shell or Python would interpret."""


def register(commands: Any) -> None:
    """Add the ``serve`` subcommand."""
    # Any: argparse's subparsers action type is private.
    parser: argparse.ArgumentParser = commands.add_parser(
        "serve", help="run gateway + local model worker on this machine (no services needed)"
    )
    parser.add_argument("--host", help="bind address (default: NILAI_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gateway port (default: NILAI_PORT or 8080)")
    parser.add_argument("--model", help="model dir or hub id (default: NILAI_MODEL or tiny)")
    parser.add_argument(
        "--device", default="cpu", help="torch device for the worker: cpu, cuda, ... (default: cpu)"
    )
    parser.add_argument("--worker-port", type=int, default=0, help="worker port (default: any)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Start the worker, wait for it, then serve the gateway until interrupted."""
    settings = load_settings("serve")
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    host: str = args.host or settings.host
    port: int = args.port or settings.port
    # Checked before the model loads: a busy port would otherwise fail only after it.
    problem = port_problem(host, port)
    if problem is not None:
        return fail("serve", problem)
    # The signing key, the key hash and the SQLite database live here: owner only (SECURITY.md).
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    model = args.model or settings.model or str(ensure_tiny_model(settings))
    worker_port = args.worker_port or _free_port()
    worker_url = f"http://127.0.0.1:{worker_port}"
    worker = _start_worker(model, args.device, worker_port)
    try:
        if not _wait_for_worker(worker, worker_url):
            return 1
        key, key_hash = api_key(settings)
        settings = settings.model_copy(
            update={
                "host": host,
                "port": port,
                "redis_url": None,
                "upstream_urls": [worker_url],
                "api_key_hashes": [*settings.api_key_hashes, key_hash],
            }
        )
        banner = banner_text(settings, key, default_model_id(model))
        _print_when_listening(f"{_client_url(host, port)}/healthz", banner)
        run_server(create_app(settings), settings)
    finally:
        _stop(worker)
    return 0


def ensure_tiny_model(settings: NilaiSettings) -> Path:
    """The tiny model in the data directory, written on first use."""
    from nilai.workers.local.tiny import NOISE_NOTICE, is_tiny_model, write_tiny_model

    directory = settings.data_dir / "tiny-model"
    if not is_tiny_model(directory):
        print(f"Generating the tiny model in {directory} (first start only) ...", flush=True)
        started = time.monotonic()
        write_tiny_model(directory)
        print(f"Done in {time.monotonic() - started:.1f}s.", flush=True)
    print(f"Note: {NOISE_NOTICE}", flush=True)
    return directory


def api_key(settings: NilaiSettings) -> tuple[str | None, str]:
    """The key to print (None if it was shown before) and its SHA-256 for the gateway.

    ``NILAI_API_KEY`` wins; otherwise a key is made on first start and only its hash is kept.
    """
    if settings.api_key is not None:
        value = settings.api_key.get_secret_value()
        return value, hashlib.sha256(value.encode()).hexdigest()
    path = settings.data_dir / KEY_HASH_FILE
    if path.exists():
        return None, path.read_text().strip()
    value = "nilai-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(value.encode()).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(digest + "\n")
    return value, digest


def _start_worker(model: str, device: str, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "nilai", "worker", "local",
        "--model", model, "--device", device, "--port", str(port),
        "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    env = {**os.environ, "NILAI_REDIS_URL": ""}
    env.pop("NILAI_REDIS_URL")
    return subprocess.Popen(command, env=env)  # noqa: S603 - our own interpreter and module


def _wait_for_worker(worker: subprocess.Popen[bytes], url: str) -> bool:
    print("Waiting for the model worker", end="", flush=True)
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            print(f"\nThe model worker exited with status {worker.returncode}; see above.")
            return False
        try:
            if httpx.get(f"{url}/v1/models", timeout=1.0).is_success:
                print(" ready.", flush=True)
                return True
        except httpx.HTTPError:
            pass
        print(".", end="", flush=True)
        time.sleep(0.5)
    print("\nThe model worker did not start in time.")
    return False


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_problem(host: str, port: int) -> str | None:
    """Why the gateway could not listen on ``host:port`` (one line with the fix), or None.

    The test binds as uvicorn will (``SO_REUSEADDR``), so a port left in TIME_WAIT by a previous
    run is not reported as busy.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"fails: {exc}"
            return (
                f"cannot listen on {host}:{port} ({reason}); pick another port with "
                f"--port {port + 1} or NILAI_PORT={port + 1} make serve"
            )
    return None


def _client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses: a wildcard bind address is not one to connect to."""
    if host in ("0.0.0.0", ""):  # noqa: S104 - comparing, not binding
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _print_when_listening(health_url: str, text: str) -> None:
    """Print ``text`` from a daemon thread once ``health_url`` answers.

    uvicorn binds its socket only after the app's start-up, so a banner printed before
    ``run_server`` would invite requests that are refused; this one appears when they succeed.
    """

    def wait_then_print() -> None:
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(health_url, timeout=1.0).is_success:
                    print(text, flush=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    threading.Thread(target=wait_then_print, name="nilai-serve-banner", daemon=True).start()


def _nilai_command() -> str:
    """The ``nilai`` program beside the running interpreter, or ``python -m nilai``.

    ``nilai`` need not be on PATH (a virtualenv that is not activated); a user install puts the
    script elsewhere than the interpreter, where ``-m`` still finds the package.
    """
    script = Path(sys.executable).parent / "nilai"
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m nilai"


def banner_text(settings: NilaiSettings, key: str | None, model: str) -> str:
    """What ``nilai serve`` prints once it answers: the URL, the key and commands to paste.

    Every command works when pasted into a POSIX shell from any directory: the programs are
    named by absolute path (the running interpreter and the ``nilai`` beside it, in a
    virtualenv or a ``pip install nilai`` alike), and a key that is not printed is read from
    ``$NILAI_API_KEY`` by the shell (in double quotes) or by Python (``os.environ``), never
    written as a literal ``"$NILAI_API_KEY"`` string.
    """
    url = _client_url(settings.host, settings.port)
    python = shlex.quote(sys.executable)
    nilai = _nilai_command()
    answer = shlex.quote(str(Path(tempfile.gettempdir()) / "nilai-answer.json"))
    if key is not None and PASTABLE_KEY.fullmatch(key):
        shell_key = key
        python_key = f'"{key}"'
    else:
        # A key with shell or Python quoting characters (a NILAI_API_KEY of the user's own)
        # is read from the environment instead of being quoted here.
        shell_key = "$NILAI_API_KEY"
        python_key = 'os.environ["NILAI_API_KEY"]'
    key_line = (
        f"API key (shown once, keep it): {key}"
        if key is not None
        else "API key: the one printed on first start; set NILAI_API_KEY to it in your shell "
        f"(only its hash is kept in {settings.data_dir / KEY_HASH_FILE}; delete that file "
        "to get a new key)"
    )
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}'
    return f"""
nilai is serving at {url}
{key_line}

Ask for a completion and keep the signed answer:
  curl -s {url}/v1/chat/completions \\
    -H "Authorization: Bearer {shell_key}" -H "Content-Type: application/json" \\
    -d '{body}' | tee {answer}

Verify its signature against the key the gateway publishes:
  {nilai} verify {answer} --gateway {url}

The same with the openai SDK:
  {python} -c 'import os
from openai import OpenAI
c = OpenAI(base_url="{url}/v1", api_key={python_key})
print(c.chat.completions.create(model="{model}",
      messages=[{{"role": "user", "content": "Hi"}}]).choices[0].message.content)'

Press Ctrl-C to stop.
"""
