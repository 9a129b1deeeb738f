"""Run ASGI apps under real uvicorn on loopback, in a background thread; wait for conditions.

``wait_until`` (and ``wait_until_async``, its twin for coroutines) is the one way tests wait:
for a state, never for a time. Its timeout is only a safety net against a hang.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import threading
import time
from typing import Any

import httpx
import uvicorn


def bind_loopback(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on a loopback address (Linux routes all of 127.0.0.0/8 to lo)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` on ``host``:``port`` (0 picks one) until ``stop()``.

    ``host`` is a loopback address: 127.0.0.1, or another of 127.0.0.0/8 for a server the
    gateway must treat as a different (e.g. forbidden) address.
    """

    def __init__(self, app: Any, port: int = 0, *, host: str = "127.0.0.1") -> None:
        self.app = app
        self._sock = bind_loopback(port, host)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        # As `nilai api` with NILAI_FORWARDED_ALLOW_IPS unset: X-Forwarded-For is not believed.
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="auto",
            timeout_graceful_shutdown=2,
            proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self._sock])

    def start(self) -> ServerThread:
        self._thread.start()

        def started() -> bool:
            if not self.server.started and not self._thread.is_alive():
                raise RuntimeError("server thread died during start-up")
            return self.server.started

        wait_until(started, timeout_s=15, interval_s=0.01, what="the server's start-up")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def wait_until(
    predicate: Any,
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
    *,
    what: str = "the condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    ``timeout_s`` is a safety net against a hang, not a claim about speed: make it generous.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s}s for {what} in vain")
        time.sleep(interval_s)


async def wait_until_async(
    predicate: Any,
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
    *,
    what: str = "the condition",
) -> Any:
    """``wait_until`` for a coroutine function, polled without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s}s for {what} in vain")
        await asyncio.sleep(interval_s)


def get_json(url: str, **kwargs: Any) -> Any:
    return httpx.get(url, timeout=5, **kwargs).json()


def stop_process(process: Any, timeout_s: float = 10.0) -> None:
    """SIGTERM a subprocess if it still runs; SIGKILL it if it does not stop in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
