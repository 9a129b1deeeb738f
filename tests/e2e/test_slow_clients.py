"""Slow, oversized and too many clients against a real ``nilai api`` process (issue 13, item 3).

The gateway runs as ``nilai api`` does in production, with short limits set through the
environment, and the clients are raw sockets that send exactly what a hostile client would:
half a request, a header that never ends, a body that never comes. Bounds on waiting are
generous multiples of the configured timeouts; nothing here measures latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_API_KEY
from tests.support.servers import free_port, stop_process, wait_until

pytestmark = pytest.mark.e2e

NILAI = str(Path(sys.executable).parent / "nilai")
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
HEADER_LIMIT = 8192
HEADER_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 0.5
KEEPALIVE_S = 0.4
# uvicorn's own keep-alive is 5 s: the bound must stay below it to tell the two apart.
CLOSE_BOUND_S = 4.0
CAP = 4
OVERFLOW_RESERVE = 32  # nilai.gateway.server.OVERFLOW_CONNECTIONS
ELEVEN_MB = 11 * 1024 * 1024
DEFAULT_BODY_LIMIT = 10 * 1024 * 1024


@dataclass
class Api:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_api(directory: Path, *extra_args: str, **env: str) -> Api:
    """``nilai api`` on a free loopback port, answering /healthz; no Redis, SQLite store."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "api.log"
    variables = {
        **os.environ,
        "NILAI_API_KEY": TEST_API_KEY,
        "NILAI_DATA_DIR": str(directory / "data"),
        "NILAI_LOG_LEVEL": "warning",
        **env,
    }
    variables.pop("NILAI_REDIS_URL", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [NILAI, "api", "--port", str(port), *extra_args],
            env=variables,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = Api(process, port, log)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"nilai api exited:\n{api.tail()}")
        try:
            return httpx.get(f"{api.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, timeout_s=30, interval_s=0.1)
    except BaseException:
        stop_process(process)
        raise
    return api


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A gateway with short header, body and keep-alive limits."""
    api = start_api(
        tmp_path_factory.mktemp("limited"),
        NILAI_MAX_HEADER_BYTES=str(HEADER_LIMIT),
        NILAI_HEADER_READ_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        NILAI_BODY_READ_TIMEOUT_S=str(BODY_TIMEOUT_S),
        NILAI_KEEPALIVE_TIMEOUT_S=str(KEEPALIVE_S),
    )
    yield api
    stop_process(api.process)


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Api]:
    """A gateway that holds at most ``CAP`` client connections; slow clients get time."""
    api = start_api(
        tmp_path / "capped",
        NILAI_MAX_CONNECTIONS=str(CAP),
        NILAI_HEADER_READ_TIMEOUT_S="30",
        NILAI_BODY_READ_TIMEOUT_S="30",
        NILAI_KEEPALIVE_TIMEOUT_S="30",
    )
    yield api
    stop_process(api.process)


@pytest.fixture
def sockets() -> Iterator[Callable[[Api], socket.socket]]:
    """Open raw client connections; every one is closed afterwards."""
    opened: list[socket.socket] = []

    def open_to(api: Api) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
        opened.append(sock)
        return sock

    yield open_to
    for sock in opened:
        sock.close()


# --- helpers -------------------------------------------------------------------------------


def read_until_closed(sock: socket.socket, bound_s: float) -> bytes:
    """Everything the server sends until it closes; fails if it is still open after ``bound_s``."""
    sock.settimeout(bound_s)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"the gateway kept the connection open for {bound_s}s; it sent {received[:200]!r}"
            ) from None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def read_one_response(sock: socket.socket) -> bytes:
    """One complete response with a Content-Length, leaving the connection open."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def trickle(sock: socket.socket, data: bytes, interval_s: float) -> bool:
    """Send ``data`` a byte every ``interval_s``; True if the gateway answered or closed first."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            sock.settimeout(interval_s)
            sock.recv(1, socket.MSG_PEEK)  # returns at once if the gateway answered or closed
            return True
        except TimeoutError:
            continue  # still open, still waiting: send the next byte
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def open_chat_with_partial_body(sock: socket.socket) -> None:
    """An authenticated chat that declares 100 bytes of body and sends 10: the app waits."""
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: Bearer {TEST_API_KEY}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        + b'{"model": '
    )


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert error["code"] == code


# --- header size ---------------------------------------------------------------------------


def test_a_header_over_the_limit_is_answered_431_in_the_openai_shape(limited: Api):
    response = httpx.get(
        f"{limited.url}/healthz", headers={"X-Padding": "a" * (4 * HEADER_LIMIT)}, timeout=10
    )
    assert_openai_error(response, 431, "request_headers_too_large")
    assert response.headers["connection"] == "close"
    assert str(HEADER_LIMIT) in response.json()["error"]["message"]
    assert httpx.get(f"{limited.url}/healthz", timeout=5).status_code == 200


def test_headers_up_to_the_limit_are_served(limited: Api):
    # The request line and the other headers take well under 1 KiB.
    padding = "a" * (HEADER_LIMIT - 1024)
    response = httpx.get(f"{limited.url}/healthz", headers={"X-Padding": padding}, timeout=10)
    assert response.status_code == 200


def test_the_gateway_stops_reading_a_header_that_never_ends(limited, sockets):
    sock = sockets(limited)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Padding: ")
    chunk = b"a" * (1024 * 1024)
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < 32 * len(chunk):
            sock.sendall(chunk)
            sent += len(chunk)
    # The gateway read a little over the limit, answered and closed: the client could not
    # hand it 32 MiB (loopback buffers hold a few MiB at most).
    assert sent < 32 * len(chunk)
    assert httpx.get(f"{limited.url}/healthz", timeout=5).status_code == 200


# --- header and body read timeouts ---------------------------------------------------------


def test_a_client_that_sends_half_its_headers_gets_408_and_is_disconnected(limited, sockets):
    sock = sockets(limited)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
    response = read_until_closed(sock, bound_s=10 * HEADER_TIMEOUT_S)
    assert status_of(response) == 408
    assert b'"code":"request_timeout"' in response


def test_a_client_that_connects_and_sends_nothing_is_disconnected(limited, sockets):
    sock = sockets(limited)
    assert read_until_closed(sock, bound_s=10 * HEADER_TIMEOUT_S) == b""


def test_headers_trickled_a_byte_at_a_time_are_cut_off_at_the_header_deadline(limited, sockets):
    sock = sockets(limited)
    request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"a" * 50
    # Each byte comes well within the timeout: only a deadline on the whole header stops it.
    cut_off = trickle(sock, request, interval_s=HEADER_TIMEOUT_S / 5)
    assert cut_off, "the gateway kept reading headers trickled for longer than their deadline"


def test_a_client_that_stops_sending_its_body_gets_408_and_is_disconnected(limited, sockets):
    sock = sockets(limited)
    open_chat_with_partial_body(sock)
    response = read_until_closed(sock, bound_s=10 * BODY_TIMEOUT_S)
    assert status_of(response) == 408
    assert b'"code":"request_timeout"' in response
    assert b"Exception in ASGI application" not in limited.log.read_bytes()


def test_a_body_trickled_a_byte_at_a_time_is_cut_off_at_the_body_deadline(limited, sockets):
    sock = sockets(limited)
    open_chat_with_partial_body(sock)
    # 80 of the 90 missing bytes (a complete body would be answered), each well within the
    # timeout: only a deadline on the whole body stops it.
    cut_off = trickle(sock, b" " * 80, interval_s=BODY_TIMEOUT_S / 5)
    assert cut_off, "the gateway kept reading a body trickled for longer than its deadline"


# --- keep-alive ----------------------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(limited, sockets):
    sock = sockets(limited)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    assert status_of(read_one_response(sock)) == 200
    assert read_until_closed(sock, bound_s=CLOSE_BOUND_S) == b""


def test_a_keep_alive_connection_serves_several_requests(limited, sockets):
    sock = sockets(limited)
    for _ in range(3):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert status_of(read_one_response(sock)) == 200


# --- 413 reaches the client ----------------------------------------------------------------


def test_an_over_limit_body_with_content_length_reaches_an_async_httpx_client_as_413(limited):
    async def post_twice() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return [
                await client.post(
                    f"{limited.url}/v1/chat/completions",
                    content=b"x" * ELEVEN_MB,
                    headers={**AUTH, "Content-Type": "application/json"},
                )
                for _ in range(2)
            ]

    for response in asyncio.run(post_twice()):
        assert response.request.headers["content-length"] == str(ELEVEN_MB)
        assert_openai_error(response, 413, "payload_too_large")
        assert str(DEFAULT_BODY_LIMIT) in response.json()["error"]["message"]


# --- connection cap ------------------------------------------------------------------------


def models_status(api: Api) -> int:
    """GET /v1/models on a new connection."""
    return httpx.get(f"{api.url}/v1/models", headers=AUTH, timeout=10).status_code


def test_the_connection_cap_holds_and_liveness_is_still_answered(capped, sockets):
    members = [sockets(capped) for _ in range(CAP)]
    for sock in members:
        open_chat_with_partial_body(sock)  # a request in progress: never reclaimed
    wait_until(lambda: models_status(capped) == 503, timeout_s=10)
    refused = httpx.get(f"{capped.url}/v1/models", headers=AUTH, timeout=10)
    assert_openai_error(refused, 503, "too_many_connections")
    assert refused.headers["retry-after"] == "1"
    assert_openai_error(httpx.get(f"{capped.url}/readyz", timeout=10), 503, "too_many_connections")
    liveness = httpx.get(f"{capped.url}/healthz", timeout=10)
    assert liveness.status_code == 200
    assert liveness.headers["connection"] == "close"

    # One member leaves: its slot is free for the next client.
    members[0].close()
    wait_until(lambda: models_status(capped) == 200, timeout_s=10)


def test_beyond_the_cap_and_its_reserve_new_connections_are_closed_unanswered(capped, sockets):
    for sock in [sockets(capped) for _ in range(CAP)]:
        open_chat_with_partial_body(sock)
    wait_until(lambda: models_status(capped) == 503, timeout_s=10)
    reserve = [sockets(capped) for _ in range(OVERFLOW_RESERVE)]  # silent, holding the reserve
    late = sockets(capped)
    late.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    assert read_until_closed(late, bound_s=10) == b""
    for sock in reserve:
        sock.close()
    wait_until(lambda: httpx.get(f"{capped.url}/healthz", timeout=10).status_code == 200)


def test_at_the_cap_the_longest_idle_connection_makes_room(capped, sockets):
    idle = [sockets(capped) for _ in range(CAP)]
    for sock in idle:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert status_of(read_one_response(sock)) == 200
    # Every slot holds an idle keep-alive connection; a new client takes the oldest one's.
    wait_until(lambda: models_status(capped) == 200, timeout_s=10)
    assert read_until_closed(idle[0], bound_s=10) == b""
    # The others keep their slots and go on serving.
    for sock in idle[1:]:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert status_of(read_one_response(sock)) == 200


# --- every worker process gets the limits --------------------------------------------------


def test_nilai_api_with_workers_applies_the_limits_in_every_worker(tmp_path):
    api = start_api(tmp_path / "workers", "--workers", "2", NILAI_MAX_HEADER_BYTES="4096")
    try:
        for _ in range(6):  # new connections, spread over both workers by the kernel
            response = httpx.get(
                f"{api.url}/healthz", headers={"X-Padding": "a" * 8192}, timeout=10
            )
            assert_openai_error(response, 431, "request_headers_too_large")
    finally:
        stop_process(api.process)
