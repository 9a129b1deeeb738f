"""Draining one replica of many, on processes: what Kubernetes does to a pod, without Kubernetes.

Two real ``nilai api`` processes share this machine's Redis (a private key prefix) and one
PostgreSQL database, in front of one slow-streaming fake model server, as two gateway pods of the
Helm chart do. Twenty streaming clients are spread across both; one replica gets SIGTERM while
every stream is open. Each of its clients must see either a whole answer or an error event then
``[DONE]``, never a stream simply cut; every request's query-log row must reach the database;
and the other replica must answer new requests all the while.

The model server's side of a pod deletion is the ``nilai announce`` sidecar: on SIGTERM it must
take the registration out of Redis before it exits, not leave it to expire. And a stopping gateway
must withdraw nothing it does not own: the last test checks that it leaves the
``NILAI_UPSTREAM_URLS`` registrations every replica shares to their lease.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import select

from nilai.store.sql import SqlStore, make_engine
from nilai.store.tables import QueryLogRow
from tests.conftest import REDIS_URL, FakeHandle
from tests.support.replicas import AUTH, NILAI, Replica, wait_serving
from tests.support.servers import stop_process, wait_until
from tests.support.stores import pg_url, run_sync

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CLIENTS_PER_REPLICA = 10
GRACE_S = 1.5
"""The draining replica's NILAI_SHUTDOWN_GRACE_S: far shorter than a stream (tokens x delay)."""
TOKENS = 60
TOKEN_DELAY_S = 0.05
MAX_POLLS = 2_000
"""A bound on the requests the watcher sends the other replica while the first one drains."""


@dataclass
class Outcome:
    """What one streaming client saw."""

    replica: str
    request_id: str
    raw: bytes = b""
    error: str | None = None

    def payloads(self) -> list[str]:
        """The ``data:`` payloads of the stream, in order."""
        lines = self.raw.decode(errors="replace").splitlines()
        return [line[6:] for line in lines if line.startswith("data: ")]

    def complete(self) -> bool:
        """A whole answer: a finish reason, no error event, and ``[DONE]`` last."""
        payloads = self.payloads()
        if not payloads or payloads[-1] != "[DONE]":
            return False
        events = [json.loads(payload) for payload in payloads[:-1]]
        finished = any(
            choice.get("finish_reason") for event in events for choice in event.get("choices", [])
        )
        return finished and not any("error" in event for event in events)

    def ended_by_shutdown(self) -> bool:
        """Ended on the replica's terms: an error event (shutting_down), then ``[DONE]``."""
        payloads = self.payloads()
        if len(payloads) < 2 or payloads[-1] != "[DONE]":
            return False
        error = json.loads(payloads[-2]).get("error", {})
        return error.get("code") == "shutting_down"


@dataclass
class Watch:
    """The other replica's answers to new requests while the first one drains."""

    statuses: list[int] = field(default_factory=list[int])
    refusals: list[str] = field(default_factory=list[str])
    during_drain: int = 0
    failures: list[str] = field(default_factory=list[str])


def _stream(url: str, outcome: Outcome, first_bytes: threading.Barrier) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {**AUTH, "X-Request-ID": outcome.request_id}
    try:
        with (
            httpx.Client(timeout=60) as client,
            client.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers=headers
            ) as response,
        ):
            if response.status_code != 200:
                outcome.error = f"status {response.status_code}"
                first_bytes.abort()
                return
            chunks = response.iter_raw()
            outcome.raw = next(chunks)
            first_bytes.wait()
            for chunk in chunks:
                outcome.raw += chunk
    except (httpx.HTTPError, threading.BrokenBarrierError) as error:
        # A stream cut without its error event shows up here (or as an incomplete body).
        outcome.error = repr(error)


def _watch(survivor: Replica, draining: Replica, watch: Watch) -> None:
    """Send the survivor new requests until the draining replica has exited, and once more."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "still there?"}]}
    with httpx.Client(timeout=30) as client:
        for _ in range(MAX_POLLS):
            alive = draining.process.poll() is None
            try:
                response = client.post(
                    f"{survivor.url}/v1/chat/completions", json=body, headers=AUTH
                )
            except httpx.HTTPError as error:
                watch.failures.append(repr(error))
                return
            watch.statuses.append(response.status_code)
            if response.status_code != 200:
                watch.refusals.append(response.text[:300])
            if alive:
                watch.during_drain += 1
            else:
                return


@pytest.fixture
def start_announce(
    tmp_path: Path, redis_prefix: str
) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start `nilai announce` processes (the chart's sidecar) on the test's Redis prefix.

    Each one still running afterwards is stopped.
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(url: str) -> subprocess.Popen[bytes]:
        env = {
            "PATH": str(Path(NILAI).parent),
            "NILAI_REDIS_URL": REDIS_URL,
            "NILAI_REDIS_PREFIX": redis_prefix,
            "NILAI_LOG_LEVEL": "info",
        }
        with (tmp_path / f"announce-{len(started)}.log").open("wb") as out:
            # A lease far longer than the tests: only a withdrawal can end it this soon.
            process = subprocess.Popen(
                [NILAI, "announce", "--url", url, "--ttl", "120"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        return process

    yield start
    for process in started:
        stop_process(process)


def _registrations(prefix: str) -> list[bytes]:
    """The discovery records under ``prefix`` in Redis (one per announced model server)."""
    # redis-py's client methods are partly untyped (their **kwargs).
    client = redis.Redis.from_url(REDIS_URL)  # pyright: ignore[reportUnknownMemberType]
    try:
        pattern = f"{prefix}discovery:endpoint:*"
        return [bytes(key) for key in client.scan_iter(match=pattern)]  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType, reportUnknownArgumentType]
    finally:
        client.close()


async def _logged(url: str, request_ids: list[str]) -> set[str]:
    """Which of ``request_ids`` have their query-log row in the database."""
    engine = make_engine(url)
    try:
        async with SqlStore(engine).session() as session:
            query = select(QueryLogRow.request_id).where(QueryLogRow.request_id.in_(request_ids))
            return set((await session.execute(query)).scalars())
    finally:
        await engine.dispose()


def test_sigterm_to_one_of_two_replicas_under_20_streams(
    pg_database: str,
    redis_prefix: str,
    start_fake: Callable[..., FakeHandle],
    start_replica: Callable[..., Replica],
    start_announce: Callable[[str], subprocess.Popen[bytes]],
):
    fake = start_fake(tokens=TOKENS, token_delay_s=TOKEN_DELAY_S)
    # Registered as the chart does it: by an announce sidecar, which the gateways do not own.
    start_announce(fake.url)
    database = {"NILAI_DATABASE_URL": pg_url(pg_database)}
    draining = start_replica("draining", NILAI_SHUTDOWN_GRACE_S=str(GRACE_S), **database)
    survivor = start_replica("survivor", **database)
    wait_serving(draining, survivor)

    outcomes = [
        Outcome(replica.log.stem, f"drain-{replica.log.stem}-{i}-{uuid.uuid4().hex[:8]}")
        for replica in (draining, survivor)
        for i in range(CLIENTS_PER_REPLICA)
    ]
    urls = {"draining": draining.url, "survivor": survivor.url}
    first_bytes = threading.Barrier(len(outcomes) + 1)
    clients = [
        threading.Thread(target=_stream, args=(urls[o.replica], o, first_bytes)) for o in outcomes
    ]
    for client in clients:
        client.start()
    first_bytes.wait(timeout=30)  # every stream is open on both replicas

    watch = Watch()
    watcher = threading.Thread(target=_watch, args=(survivor, draining, watch))
    draining.process.send_signal(signal.SIGTERM)
    watcher.start()
    # uvicorn re-raises the signal once it has shut down gracefully.
    assert draining.process.wait(timeout=GRACE_S + 20) in (0, -signal.SIGTERM), draining.tail()
    # It withdrew nothing it does not own: the model server is still registered.
    assert len(_registrations(redis_prefix)) == 1
    # The drained replica flushed its query log before exiting: its rows are there already.
    drained_ids = [o.request_id for o in outcomes if o.replica == "draining"]
    assert run_sync(_logged(pg_url(pg_database), drained_ids)) == set(drained_ids)

    watcher.join(timeout=60)
    for client in clients:
        client.join(timeout=60)
    assert not any(client.is_alive() for client in clients)

    for outcome in outcomes:
        assert outcome.error is None, (outcome.replica, outcome.error, outcome.raw[-300:])
        if outcome.replica == "survivor":
            assert outcome.complete(), outcome.raw[-500:]
        else:
            assert outcome.complete() or outcome.ended_by_shutdown(), outcome.raw[-500:]
    assert any(o.ended_by_shutdown() for o in outcomes if o.replica == "draining")

    assert watch.failures == []
    assert watch.during_drain >= 1
    assert set(watch.statuses) == {200}, watch.refusals[:3]

    all_ids = [o.request_id for o in outcomes]
    wait_until(
        lambda: run_sync(_logged(pg_url(pg_database), all_ids)) == set(all_ids),
        timeout_s=30,
        what="all 20 query-log rows",
    )
    assert "Traceback" not in draining.log.read_text()
    drained = [o for o in outcomes if o.replica == "draining"]
    print(  # the run in numbers, for `pytest -s`
        f"draining replica: {sum(o.complete() for o in drained)} streams complete, "
        f"{sum(o.ended_by_shutdown() for o in drained)} ended by an error event and [DONE]; "
        f"survivor: {sum(o.complete() for o in outcomes if o.replica == 'survivor')} complete, "
        f"{len(watch.statuses)} new requests answered {sorted(set(watch.statuses))} "
        f"({watch.during_drain} during the drain); query-log rows {len(all_ids)}/{len(all_ids)}"
    )


def test_announce_sidecar_withdraws_before_it_exits(
    redis_prefix: str,
    start_fake: Callable[..., FakeHandle],
    start_announce: Callable[[str], subprocess.Popen[bytes]],
):
    sidecar = start_announce(start_fake().url)
    wait_until(lambda: _registrations(redis_prefix), timeout_s=20, what="the registration")
    sidecar.send_signal(signal.SIGTERM)
    assert sidecar.wait(timeout=15) == 0
    # Its lease had two minutes left: only the sidecar's own withdrawal removes it by now.
    assert _registrations(redis_prefix) == []


def test_a_stopping_replica_leaves_shared_static_upstreams_registered(
    redis_prefix: str,
    start_fake: Callable[..., FakeHandle],
    start_replica: Callable[..., Replica],
):
    fake = start_fake()
    draining = start_replica("draining", NILAI_UPSTREAM_URLS=fake.url)
    # A long lease: the survivor renews its announcement only every 20 s.
    survivor = start_replica("survivor", NILAI_UPSTREAM_URLS=fake.url, NILAI_DISCOVERY_TTL_S="60")
    wait_serving(draining, survivor)
    draining.process.send_signal(signal.SIGTERM)
    assert draining.process.wait(timeout=20) in (0, -signal.SIGTERM)
    # The survivor still announces the model server: its registration must still be there.
    assert len(_registrations(redis_prefix)) == 1
