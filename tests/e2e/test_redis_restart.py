"""A Redis restart under load: clients see 200 or a retryable 503, never 404 or 500 (issue 13.5).

A private ``redis-server`` holds discovery and the limits of a real ``nilai api``; a real
``nilai announce`` keeps a fake model server registered in it with the default lease (so its
normal renewal is 5 s apart). Ten clients send chats in a closed loop while Redis is stopped and
started again on the same port, empty: every registration, counter and loaded script is gone,
and every pooled connection of the gateway and the announcer is dead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import TEST_API_KEY, FakeHandle
from tests.support.private_redis import PrivateRedis
from tests.support.replicas import Replica, wait_serving
from tests.support.servers import stop_process, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

NILAI = str(Path(sys.executable).parent / "nilai")
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
CLIENTS = 10
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Outcome:
    """One request as its client saw it."""

    started: float
    ended: float
    status: int  # 0: no HTTP answer at all
    retry_after: str | None
    code: str | None


class Traffic:
    """``CLIENTS`` closed-loop clients (half of them streaming) until ``stop``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i % 2 == 1,), daemon=True)
            for i in range(CLIENTS)
        ]

    def start(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _client(self, stream: bool) -> None:
        body = {"model": "fake-model", "messages": MESSAGES, "stream": stream}
        with httpx.Client(timeout=15) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post(
                        f"{self.url}/v1/chat/completions", json=body, headers=AUTH
                    )
                except httpx.HTTPError:
                    outcome = Outcome(started, time.monotonic(), 0, None, None)
                else:
                    code = None
                    if response.status_code != 200:
                        code = str(response.json().get("error", {}).get("code"))
                    outcome = Outcome(
                        started,
                        time.monotonic(),
                        response.status_code,
                        response.headers.get("Retry-After"),
                        code,
                    )
                with self._lock:
                    self.outcomes.append(outcome)

    def since(self, moment: float) -> list[Outcome]:
        """Requests sent at or after ``moment``."""
        with self._lock:
            return [o for o in self.outcomes if o.started >= moment]


@pytest.fixture
def start_announcer(tmp_path: Path) -> Iterator[Callable[[str, str, str], Path]]:
    """``nilai announce`` processes, stopped (and so withdrawn) at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(url: str, redis_url: str, prefix: str) -> Path:
        log = tmp_path / f"announce-{len(started)}.log"
        env = {
            **os.environ,
            "NILAI_REDIS_URL": redis_url,
            "NILAI_REDIS_PREFIX": prefix,
            "NILAI_LOG_LEVEL": "info",
        }
        env.pop("NILAI_DISCOVERY_TTL_S", None)  # the default lease: renewed every 5 s
        with log.open("wb") as out:
            started.append(
                subprocess.Popen(
                    [NILAI, "announce", "--url", url], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )
        return log

    yield start
    for process in started:
        stop_process(process)


def _registered(server: PrivateRedis, prefix: str) -> bool:
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1)
    try:
        return bool(client.scard(f"{prefix}discovery:index"))
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def test_redis_restart_under_load_gives_no_404_and_no_503_tail(
    private_redis: PrivateRedis,  # first: it stops after the processes that use it
    start_fake: Callable[..., FakeHandle],
    start_replica: Callable[..., Replica],
    start_announcer: Callable[[str, str, str], Path],
    redis_prefix: str,
):
    fake = start_fake()
    gateway = start_replica(
        "gateway",
        NILAI_REDIS_URL=private_redis.url,
        NILAI_RATE_LIMIT_MINUTE="1000000",  # counted on every request, never reached
        NILAI_LOG_LEVEL="info",
    )
    announcer_log = start_announcer(fake.url, private_redis.url, redis_prefix)
    wait_serving(gateway)
    traffic = Traffic(gateway.url).start()
    try:
        wait_until(lambda: len(traffic.since(0)) >= 100, timeout_s=30)

        private_redis.stop()
        stopped = time.monotonic()
        # Failing closed: the limits cannot be checked while Redis is away. Down until the
        # announcer noticed too (its next renewal, at most 5 s away).
        wait_until(lambda: len(traffic.since(stopped)) >= 50, timeout_s=30)
        wait_until(lambda: "ConnectionError" in announcer_log.read_text(), timeout_s=15)
        private_redis.start()  # the same port, empty
        restarted = time.monotonic()

        # Serving again once Redis answers, then for as long as the announcer's own lease
        # renewal would take (5 s): the window in which the registrations are missing.
        wait_until(lambda: any(o.status == 200 for o in traffic.since(restarted)), timeout_s=15)
        serving = time.monotonic()
        wait_until(lambda: _registered(private_redis, redis_prefix), timeout_s=15)
        registered = time.monotonic()
        wait_until(lambda: len(traffic.since(registered)) >= 300, timeout_s=30)
    finally:
        traffic.stop()

    outcomes = traffic.since(0)
    statuses = Counter(o.status for o in outcomes)
    after = [o for o in outcomes if o.started >= restarted]
    tail = [o for o in outcomes if o.started >= serving]
    refused_after = Counter((o.status, o.code) for o in after if o.status != 200)
    print(
        f"\n{len(outcomes)} requests: {dict(statuses)}; after the restart: "
        f"{len(after)} requests, refused {dict(refused_after)}; "
        f"after the first success: {Counter(o.status for o in tail)}; "
        f"serving again {serving - restarted:.2f} s after the restart, "
        f"announced again after {registered - restarted:.2f} s"
    )
    assert statuses[404] == 0, refused_after
    assert statuses[500] == 0
    assert set(statuses) <= {200, 503}, statuses
    assert all(o.retry_after for o in outcomes if o.status == 503)
    # Once one request went through after the restart, no later one is refused: neither the
    # missing registrations nor dead pooled connections cost a client anything.
    assert [o for o in tail if o.status != 200] == []

    log = gateway.log.read_text(errors="replace")
    outage_lines = [line for line in log.splitlines() if "rate limiter unavailable" in line]
    assert len(outage_lines) == 1, outage_lines  # once per outage, not once per request
    assert "ConnectionError" in outage_lines[0]
    assert "Connection refused" in outage_lines[0]  # the cause, not just a type name
    assert "rate limiter available again" in log
    # The gateway kept routing to the server while it announced itself again.
    assert "discovery lost every registration" in log
    assert "every model server announced again" in log
    assert "Traceback" not in log
    announced = announcer_log.read_text(errors="replace")
    (announcer_outage,) = [line for line in announced.splitlines() if "unavailable" in line]
    assert "Connection refused" in announcer_outage
    assert "available again" in announced
    assert f"announced {fake.url} again" in announced
    assert "Traceback" not in announced
