"""``nilai serve``: the embedded all-in-one — gateway plus a local worker, nothing else needed.

The worker runs as a child process (torch never loads into the gateway, and generation never
competes with the gateway's event loop); discovery and state stay in-process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from nilai.cli.common import load_settings
from nilai.gateway.app import create_app
from nilai.gateway.server import run_server
from nilai.logging import configure_logging
from nilai.settings import NilaiSettings
from nilai.workers.local.engine import default_model_id

KEY_HASH_FILE = "serve_api_key.sha256"
WORKER_START_TIMEOUT_S = 600.0


def register(commands: Any) -> None:
    """Add the ``serve`` subcommand."""
    # Any: argparse's subparsers action type is private.
    parser: argparse.ArgumentParser = commands.add_parser(
        "serve", help="run gateway + local model worker on this machine (no services needed)"
    )
    parser.add_argument("--host", help="bind address (default: NILAI_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gateway port (default: NILAI_PORT or 8080)")
    parser.add_argument("--model", help="model dir or hub id (default: NILAI_MODEL or tiny)")
    parser.add_argument("--device", default="cpu", help="torch device for the worker")
    parser.add_argument("--worker-port", type=int, default=0, help="worker port (default: any)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Start the worker, wait for it, then serve the gateway until interrupted."""
    settings = load_settings("serve")
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
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
                "host": args.host or settings.host,
                "port": args.port or settings.port,
                "redis_url": None,
                "upstream_urls": [worker_url],
                "api_key_hashes": [*settings.api_key_hashes, key_hash],
            }
        )
        _print_banner(settings, key, default_model_id(model))
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


def _print_banner(settings: NilaiSettings, key: str | None, model: str) -> None:
    url = f"http://{settings.host}:{settings.port}"
    if key is not None:
        key_line = f"API key (shown once, keep it): {key}"
        shell_key = key
    else:
        key_line = (
            "API key: the one printed on first start (only its hash is kept in "
            f"{settings.data_dir / KEY_HASH_FILE}; delete that file to get a new key)"
        )
        shell_key = "$NILAI_API_KEY"
    print(
        f"""
nilai is serving at {url}
{key_line}

  curl {url}/v1/chat/completions \\
    -H "Authorization: Bearer {shell_key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{url}/v1", api_key="{shell_key}")
print(c.chat.completions.create(model="{model}",
      messages=[{{"role": "user", "content": "Hi"}}]).choices[0].message.content)'

Verify a saved answer: nilai verify answer.json --gateway {url}
Press Ctrl-C to stop.
""",
        flush=True,
    )
