"""Shutdown: streams still open when the grace period is about to end finish on their own terms.

A real ``nilai api`` process relays slow streams from a fake model server; SIGTERM arrives while
they are open. Each stream must end with an in-band error event and ``[DONE]`` before the grace
period runs out, be recorded as ended by shutdown (not as the client's doing), and leave one log
line each and no traceback.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import FakeHandle
from tests.support.replicas import AUTH, Replica, wait_serving

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

STREAMS = 3
GRACE_S = 2.0


def _open_stream(url: str, first_bytes: threading.Barrier, out: list[bytes]) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH) as response,
    ):
        assert response.status_code == 200
        chunks = response.iter_raw()
        received = next(chunks)
        first_bytes.wait()
        out.append(received + b"".join(chunks))


def _data(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]


def test_streams_open_at_shutdown_end_with_an_error_event_and_done(
    tmp_path: Path,
    start_fake: Callable[..., FakeHandle],
    start_replica: Callable[..., Replica],
):
    # Each stream would take 60 s: far longer than the grace period.
    fake = start_fake(tokens=300, token_delay_s=0.2)
    replica = start_replica(
        "gw",
        NILAI_UPSTREAM_URLS=fake.url,
        NILAI_SHUTDOWN_GRACE_S=str(GRACE_S),
        NILAI_LOG_LEVEL="info",
    )
    wait_serving(replica)

    first_bytes = threading.Barrier(STREAMS + 1)
    results: list[bytes] = []
    clients = [
        threading.Thread(target=_open_stream, args=(replica.url, first_bytes, results))
        for _ in range(STREAMS)
    ]
    for client in clients:
        client.start()
    first_bytes.wait(timeout=20)

    replica.process.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once it has shut down gracefully.
    assert replica.process.wait(timeout=GRACE_S + 10) in (0, -signal.SIGTERM)
    for client in clients:
        client.join(timeout=10)

    assert len(results) == STREAMS
    for raw in results:
        payloads = _data(raw)
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "shutting_down"
        assert error["type"] == "service_unavailable"

    log = replica.log.read_text()
    assert "Traceback" not in log
    assert "Cancel" not in log  # uvicorn had no task left to cancel
    ended = [line for line in log.splitlines() if "error=ShuttingDown" in line]
    assert len(ended) == STREAMS, log

    with sqlite3.connect(tmp_path / "gw" / "nilai.db") as db:
        rows = db.execute("SELECT status_code, error_kind, streamed FROM query_logs").fetchall()
    assert sorted(rows) == [(503, "ShuttingDown", 1)] * STREAMS
