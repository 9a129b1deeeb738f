"""`nilai worker local` with Redis announces itself once it answers, not before."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from typing import Any

import httpx
import pytest
import uvicorn

from nilai.cli import worker_local
from nilai.discovery.announcer import until_answering
from tests.conftest import REDIS_URL
from tests.support.servers import free_port, wait_until
from tests.unit.workers.local.test_server import FakeEngine


@pytest.fixture
def started_servers(monkeypatch: pytest.MonkeyPatch) -> list[uvicorn.Server]:
    """Every uvicorn server built from here on, so the test can stop the worker it started."""
    servers: list[uvicorn.Server] = []
    original = uvicorn.Server.__init__

    def recording_init(self: uvicorn.Server, config: uvicorn.Config) -> None:
        original(self, config)
        servers.append(self)

    monkeypatch.setattr(uvicorn.Server, "__init__", recording_init)
    return servers


def test_worker_announces_itself_once_serving_without_a_not_answering_warning(
    monkeypatch, redis_prefix, started_servers, caplog
):
    monkeypatch.setenv("NILAI_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("NILAI_REDIS_PREFIX", redis_prefix)
    # A lease long enough that a worker announced only on its second try would time the test out.
    monkeypatch.setenv("NILAI_DISCOVERY_TTL_S", "60")
    monkeypatch.setattr("nilai.workers.local.engine.TransformersEngine", _fake_engine)
    monkeypatch.setattr(worker_local, "configure_logging", lambda *_: None)
    caplog.set_level(logging.INFO, logger="nilai.discovery.announcer")
    port = free_port()
    args = argparse.Namespace(
        model="fake", device="cpu", host="127.0.0.1", port=port, model_id=None, parent_pid=None
    )
    worker = threading.Thread(target=worker_local.run_local, args=(args,), daemon=True)
    worker.start()
    try:
        wait_until(lambda: _announced(caplog), timeout_s=10)
    finally:
        wait_until(lambda: started_servers)
        started_servers[0].should_exit = True
        worker.join(timeout=10)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "not answering" in m], messages
    assert f"announced http://127.0.0.1:{port} serving fake-model" in messages


def _fake_engine(*_: Any, **__: Any) -> FakeEngine:
    return FakeEngine()


def _announced(caplog: pytest.LogCaptureFixture) -> bool:
    return any(r.getMessage().startswith("announced") for r in caplog.records)


async def test_waiting_for_a_server_that_never_answers_ends_when_stopped():
    stop = asyncio.Event()
    async with httpx.AsyncClient() as http:
        waiting = asyncio.create_task(
            until_answering(http, f"http://127.0.0.1:{free_port()}", stop, interval_s=0.01)
        )
        await asyncio.sleep(0.05)  # a few failed checks, then the worker shuts down
        stop.set()
        assert await waiting is False
