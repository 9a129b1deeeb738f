"""Real ``nilai api`` processes sharing this machine's Redis, as replicas of one deployment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL, TEST_API_KEY
from tests.support.servers import free_port, stop_process, wait_until

NILAI = str(Path(sys.executable).parent / "nilai")
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def start_replica(tmp_path: Path, redis_prefix: str) -> Iterator[Callable[..., Replica]]:
    """Start ``nilai api`` processes on the shared Redis, all under one test prefix.

    Every one still running is stopped afterwards, before the prefix's keys are deleted.
    """
    started: list[Replica] = []

    def start(name: str, **env: str) -> Replica:
        port = free_port()
        data = tmp_path / name
        data.mkdir()
        log = tmp_path / f"{name}.log"
        variables = {
            **os.environ,
            "NILAI_API_KEY": TEST_API_KEY,
            "NILAI_DATA_DIR": str(data),
            "NILAI_REDIS_URL": REDIS_URL,
            "NILAI_REDIS_PREFIX": redis_prefix,
            "NILAI_DISCOVERY_REFRESH_S": "0.2",
            "NILAI_DISCOVERY_TTL_S": "3",
            "NILAI_RATE_LIMIT_MINUTE": "0",
            "NILAI_RATE_LIMIT_HOUR": "0",
            "NILAI_RATE_LIMIT_DAY": "0",
            "NILAI_LOG_LEVEL": "warning",
            **env,
        }
        with log.open("wb") as out:
            process = subprocess.Popen(
                [NILAI, "api", "--port", str(port)],
                env=variables,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        replica = Replica(process, f"http://127.0.0.1:{port}", log)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        stop_process(replica.process)


def wait_serving(*replicas: Replica, timeout_s: float = 20) -> None:
    """Wait until every replica lists the fake model (listing models counts against nothing)."""

    def serving(replica: Replica) -> bool:
        if replica.process.poll() is not None:
            raise AssertionError(f"nilai api exited:\n{replica.tail()}")
        try:
            response = httpx.get(f"{replica.url}/v1/models", headers=AUTH, timeout=2)
        except httpx.TransportError:
            return False
        return response.status_code == 200 and [m["id"] for m in response.json()["data"]] == [
            "fake-model"
        ]

    for replica in replicas:
        wait_until(lambda r=replica: serving(r), timeout_s=timeout_s, interval_s=0.1)
