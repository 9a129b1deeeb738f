"""The gateway never blocks its event loop: traffic under asyncio debug mode.

asyncio's debug mode logs every callback (task step) that runs longer than
``slow_callback_duration``. One slow step in the gateway delays every other request and stream
on that process, so any such step after warm-up fails the test. The gateway runs in its own
process, so that the test's client threads and fake model server cannot stretch its steps by
holding its GIL.

The threshold is 50 ms of debug-mode time. Debug mode records a traceback for every scheduled
callback, which roughly doubles a step's cost; the longest real steps here (a whole 32-chunk
stream relayed in one step when the model server's bytes arrive at once) take up to ~10 ms
without debug mode (measured by timing every handle, docs/PERFORMANCE.md). A blocking call —
a synchronous HTTP or database call, a CPU-heavy job on the loop — takes far longer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_API_KEY, FakeHandle
from tests.support.servers import free_port, stop_process, wait_until

pytestmark = pytest.mark.e2e

SLOW_CALLBACK_S = 0.05
ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "hello there"}]
HEADERS = {"Authorization": f"Bearer {TEST_API_KEY}"}


def chat(client: httpx.Client, url: str, *, stream: bool) -> int:
    body = {"model": "fake-model", "messages": MESSAGES, "stream": stream}
    if not stream:
        return client.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS).status_code
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=HEADERS) as r:
        for _ in r.iter_bytes():
            pass
        return r.status_code


def slow_steps(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "Executing" in line]


def test_no_slow_callbacks_under_traffic(start_fake: Callable[..., FakeHandle], tmp_path: Path):
    fake = start_fake(tokens=32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NILAI_DATA_DIR": str(tmp_path),
        "NILAI_API_KEY": TEST_API_KEY,
        "NILAI_UPSTREAM_URLS": fake.url,
        "NILAI_RATE_LIMIT_MINUTE": "100000",
    }
    log = tmp_path / "gateway.log"
    command = [sys.executable, "-m", "tests.support.debug_loop_gateway", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, str(SLOW_CALLBACK_S)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        with httpx.Client(timeout=10) as client:

            def ready() -> bool:
                assert process.poll() is None, log.read_text()
                try:
                    return client.get(f"{url}/v1/models", headers=HEADERS).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, timeout_s=30, interval_s=0.1)
            for stream in (False, True, False, True):  # warm-up: first-use imports and caches
                assert chat(client, url, stream=stream) == 200
            warm = len(slow_steps(log))
            jobs = [stream for _ in range(15) for stream in (False, True)]
            with ThreadPoolExecutor(max_workers=4) as pool:
                statuses = list(pool.map(lambda s: chat(client, url, stream=s), jobs))
            assert client.get(f"{url}/metrics").status_code == 200
            assert client.get(f"{url}/readyz").status_code == 200
    finally:
        stop_process(process)
    assert statuses == [200] * len(jobs)
    assert slow_steps(log)[warm:] == []
