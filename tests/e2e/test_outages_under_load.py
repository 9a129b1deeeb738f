"""Outages under load: the database stops for 5 s and Redis restarts while 20 clients chat.

A real ``nilai api`` process on a private PostgreSQL cluster and a private Redis (both stopped
and started by this test, never the machine's own), a fake model server announced by the
gateway itself, and 20 closed-loop clients (half with a key from the settings, half with a
stored key, streamed and not). Clients must only ever see 200 or 503 with ``Retry-After``:
never 500, never 404 for the model that is being served. Afterwards every accounted request has
its query-log row, every concurrency slot is back, and each outage is named once in the log.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
import redis

from tests.conftest import TEST_API_KEY, FakeHandle
from tests.support.private_postgres import PrivatePostgres
from tests.support.private_redis import PrivateRedis
from tests.support.replicas import Replica, wait_serving
from tests.support.servers import stop_process, wait_until
from tests.support.stores import create_tenant, run_sync, with_store

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CLIENTS = 20
DB_DOWN_AT_S, DB_DOWN_FOR_S = 2.0, 5.0
REDIS_RESTART_AT_S = 9.0
TRAFFIC_S = 13.0
OUTAGE_START = re.compile(r" unavailable( at \S+)? \(")
"""The first line of an outage: ``<what> unavailable[ at <masked URL>] (<cause>); ...``."""
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Outcome:
    status: int
    request_id: str
    code: str | None = None
    retry_after: str | None = None
    problem: str | None = None


class Client(threading.Thread):
    """Sends chat requests one after another until told to stop."""

    def __init__(self, url: str, key: str, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.index, self.stop = url, key, index, stop
        self.outcomes: list[Outcome] = []

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(timeout=30, headers=headers) as http:
            sent = 0
            while not self.stop.is_set():
                stream = (sent + self.index) % 2 == 0
                body = {"model": "fake-model", "messages": MESSAGES, "stream": stream}
                with http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
                    raw = response.read()
                self.outcomes.append(_outcome(response, raw, stream))
                sent += 1


def _outcome(response: httpx.Response, raw: bytes, stream: bool) -> Outcome:
    request_id = response.headers.get("x-request-id", "")
    if response.status_code != 200:
        code = response.json()["error"]["code"]
        retry_after = response.headers.get("retry-after")
        return Outcome(response.status_code, request_id, code, retry_after)
    problem = None
    if stream and (not raw.endswith(b"data: [DONE]\n\n") or b'"error"' in raw):
        problem = raw[-300:].decode(errors="replace")
    return Outcome(200, request_id, problem=problem)


def _stored_key(database_url: str) -> str:
    _, _, key = with_store(database_url, lambda store: create_tenant(store, "acme"))
    return key


def _rows(cluster: PrivatePostgres) -> set[str]:
    async def fetch() -> set[str]:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=cluster.port, user="postgres", database="nilai"
        )
        try:
            return {row[0] for row in await conn.fetch("SELECT request_id FROM query_logs")}
        finally:
            await conn.close()

    return run_sync(fetch())


def test_database_outage_and_redis_restart_under_load_lose_nothing(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    start_fake: Callable[..., FakeHandle],
    start_replica: Callable[..., Replica],
):
    fake = start_fake(tokens=4, token_delay_s=0.01)
    stored_key = _stored_key(private_postgres.url)
    gateway = start_replica(
        "gw",
        NILAI_DATABASE_URL=private_postgres.url,
        NILAI_REDIS_URL=private_redis.url,
        NILAI_UPSTREAM_URLS=fake.url,
        NILAI_RATE_LIMIT_MINUTE="1000000",
        NILAI_MODEL_CONCURRENCY="100",
        NILAI_LOG_LEVEL="info",
    )
    wait_serving(gateway)

    stop = threading.Event()
    clients = [
        Client(gateway.url, TEST_API_KEY if i % 2 else stored_key, i, stop) for i in range(CLIENTS)
    ]
    started = time.monotonic()
    for client in clients:
        client.start()

    def at(offset_s: float) -> None:
        time.sleep(max(0.0, started + offset_s - time.monotonic()))

    at(DB_DOWN_AT_S)
    private_postgres.stop()
    at(DB_DOWN_AT_S + DB_DOWN_FOR_S)
    private_postgres.start()
    at(REDIS_RESTART_AT_S)
    private_redis.stop()
    private_redis.start()
    at(TRAFFIC_S)
    stop.set()
    for client in clients:
        client.join(timeout=30)

    outcomes = [outcome for client in clients for outcome in client.outcomes]
    statuses = Counter(o.status for o in outcomes)
    codes = Counter(o.code for o in outcomes if o.status != 200)
    print(f"{len(outcomes)} requests: {dict(statuses)}; refusals by code: {dict(codes)}")
    assert codes["model_not_found"] == 0
    assert set(statuses) <= {200, 503}, (statuses, codes)
    assert statuses[200] > CLIENTS * 10
    assert all(o.retry_after and o.retry_after.isdigit() for o in outcomes if o.status == 503)
    assert [o.problem for o in outcomes if o.problem] == []

    # Every request that reached the chat pipeline is accounted: all but those refused before
    # authentication could finish (the accounts database was down).
    accounted = {o.request_id for o in outcomes if o.code != "accounts_unavailable"}
    wait_until(lambda: accounted <= _rows(private_postgres), timeout_s=30, interval_s=0.5)

    assert _held_slots(private_redis.url) == []
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    assert re.search(r"^nilai_chat_streams_in_flight 0\.0$", metrics, re.MULTILINE)

    stop_process(gateway.process)
    _assert_each_outage_logged_once(gateway.log.read_text())


def _held_slots(redis_url: str) -> list[bytes]:
    """Concurrency-slot keys that still hold a lease."""
    client = redis.Redis.from_url(redis_url)
    try:
        return [key for key in client.scan_iter(match="*inflight*") if client.zcard(key)]
    finally:
        client.close()


def _assert_each_outage_logged_once(log: str) -> None:
    """Each outage is named once, with its cause, by each part that met it (the key lookups and
    the query-log writer for the database), and its end once: never per request or per retry."""
    assert "Traceback" not in log
    assert "uvicorn.access" not in log
    outage_lines = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    down_lines = [line for line in outage_lines if OUTAGE_START.search(line)]
    database_down = [line for line in down_lines if "database unavailable" in line]
    database_back = [line for line in outage_lines if "database available again" in line]
    assert len(database_down) == len(database_back) == 2, outage_lines
    assert all("Connection" in line for line in database_down), database_down
    # The accounts database names where it is, password masked.
    assert any("unavailable at postgresql+asyncpg://" in line for line in database_down)
    starts = Counter(line.split()[3] for line in down_lines)
    assert set(starts.values()) == {1}, outage_lines  # one line per logger, however many requests
    assert len(outage_lines) < 20, outage_lines
