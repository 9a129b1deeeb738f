"""``GET /v1/usage`` against a large query-log table: is it still one key lookup?

Creates a throwaway PostgreSQL database, migrates it, seeds ``--rows`` query logs over
``--accounts`` accounts (one "hot" account holds a tenth of them) with matching usage totals,
then runs the real gateway on loopback and times ``GET /v1/usage`` for the hot account (with a
key stored in the database), the same for a settings key, ``store.usage()`` on its own, and for
contrast the aggregate over the raw logs that the totals table avoids. Prints a markdown table,
writes it to ``bench/results/usage.md`` and drops the database.

Run: ``python bench/usage_bench.py --rows 1000000`` (PostgreSQL on 127.0.0.1:5432, user
``postgres``, trust auth; ``--pg-dsn`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn
from sqlalchemy import func, select

from nilai import __version__
from nilai.auth.stored_keys import generate_key
from nilai.gateway.app import create_app
from nilai.settings import NilaiSettings
from nilai.store.base import ApiKey, Usage
from nilai.store.migrate import upgrade
from nilai.store.sql import SqlStore, make_engine, new_id, now
from nilai.store.tables import QueryLogRow

RESULTS = Path(__file__).with_name("results") / "usage.md"
HOT_ACCOUNT = "acct_bench_hot"
HOT_SHARE = 10  # every 10th row belongs to the hot account

SEED_ACCOUNTS = """
INSERT INTO accounts (id, name, created_at, active)
SELECT CASE WHEN g = 0 THEN $1 ELSE 'acct_bench_' || lpad(g::text, 6, '0') END,
       'bench-' || g, now() - interval '400 days', true
FROM generate_series(0, $2 - 1) AS g
"""

# Row g goes to the hot account when g % HOT_SHARE = 0, else to one of the others, evenly.
SEED_LOGS = """
INSERT INTO query_logs (
    id, request_id, account_id, api_key_id, model, started_at, latency_ms, ttft_ms,
    prompt_tokens, completion_tokens, status_code, error_kind, streamed, tools, web_search,
    nilrag, multimodal
)
SELECT md5(g::text), 'req-' || g,
       CASE WHEN g % $3 = 0 THEN $1
            ELSE 'acct_bench_' || lpad((1 + g % ($4 - 1))::text, 6, '0') END,
       NULL, 'meta-llama/Llama-3.1-8B-Instruct',
       now() - make_interval(secs => g * 30.0), 200 + (g % 1000), 50 + (g % 200),
       10 + (g % 500), 1 + (g % 300),
       CASE WHEN g % 97 = 0 THEN 499 ELSE 200 END,
       CASE WHEN g % 97 = 0 THEN 'ClientDisconnected' END,
       g % 2 = 0, g % 11 = 0, false, false, g % 13 = 0
FROM generate_series($2::bigint, $5::bigint) AS g
"""

SEED_TOTALS = """
INSERT INTO usage_totals (account_id, prompt_tokens, completion_tokens, queries)
SELECT account_id, sum(prompt_tokens), sum(completion_tokens), count(*)
FROM query_logs GROUP BY account_id
"""

SEED_CHUNK = 250_000


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="query_logs rows to seed")
    parser.add_argument("--accounts", type=int, default=1000, help="accounts to spread them on")
    parser.add_argument("--requests", type=int, default=200, help="timed GET /v1/usage calls")
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get("NILAI_BENCH_PG", "postgresql://postgres@127.0.0.1:5432"),
        help="PostgreSQL server, without a database name",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    return parser.parse_args()


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# the database


async def _admin(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(f"{dsn}/postgres")


async def create_database(dsn: str) -> str:
    """A new, empty database; returns its name."""
    name = f"nilai_bench_{uuid.uuid4().hex[:10]}"
    conn = await _admin(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(dsn: str, name: str) -> None:
    """Drop the database, ending any session still connected to it."""
    conn = await _admin(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def seed(dsn: str, name: str, rows: int, accounts: int) -> float:
    """Fill accounts, query_logs and usage_totals; returns the seconds it took."""
    started = time.perf_counter()
    conn = await asyncpg.connect(f"{dsn}/{name}")
    try:
        await conn.execute(SEED_ACCOUNTS, HOT_ACCOUNT, accounts)
        for first in range(1, rows + 1, SEED_CHUNK):
            last = min(first + SEED_CHUNK - 1, rows)
            await conn.execute(SEED_LOGS, HOT_ACCOUNT, first, HOT_SHARE, accounts, last)
            _out(f"  seeded {last:,} / {rows:,} query logs")
        await conn.execute(SEED_TOTALS)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def add_key(store: SqlStore, account_id: str) -> str:
    """Store a new key for ``account_id``; returns its value."""
    made = generate_key()
    key = ApiKey(new_id("key"), account_id, made.prefix, made.hash, "bench", now(), None, None)
    await store.add_key(key)
    return made.value


# the gateway


class Server:
    """The gateway under uvicorn on a loopback port, in a background thread."""

    def __init__(self, settings: NilaiSettings) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()


# measuring


def _stats(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {"n": len(ms), "p50": statistics.median(ms), "p95": p95, "max": ms[-1]}


def time_http(url: str, key: str, requests: int, expected: Usage | None) -> dict[str, float]:
    """Time ``requests`` sequential ``GET /v1/usage`` calls (after a short warm-up)."""
    headers = {"Authorization": f"Bearer {key}"}
    samples: list[float] = []
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        for i in range(requests + 10):
            started = time.perf_counter()
            response = client.get("/v1/usage")
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if i >= 10:  # noqa: PLR2004 - the warm-up
                samples.append(elapsed)
        body = response.json()
    if expected is not None:
        got = Usage(body["prompt_tokens"], body["completion_tokens"], body["queries"])
        if got != expected:
            raise RuntimeError(f"/v1/usage answered {got}, the seeded totals are {expected}")
    return _stats(samples)


async def time_async(
    action: Callable[[], Awaitable[Any]], repeats: int, warmup: int = 5
) -> dict[str, float]:
    """Time ``action()`` ``repeats`` times, one after another."""
    # Any: whatever the timed call returns is discarded.
    for _ in range(warmup):
        await action()
    samples: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - started)
    return _stats(samples)


async def measure_store(url: str, requests: int) -> tuple[dict[str, dict[str, float]], Usage, int]:
    """Time ``store.usage`` and the raw aggregate; returns the timings, the totals, hot rows."""
    engine = make_engine(url)
    store = SqlStore(engine)
    aggregate = select(
        func.sum(QueryLogRow.prompt_tokens),
        func.sum(QueryLogRow.completion_tokens),
        func.count(),
    ).where(QueryLogRow.account_id == HOT_ACCOUNT)

    async def raw_aggregate() -> Usage:
        async with store.session() as session:
            prompt, completion, queries = (await session.execute(aggregate)).one()
        return Usage(int(prompt or 0), int(completion or 0), int(queries))

    try:
        totals = await store.usage(HOT_ACCOUNT)
        if await raw_aggregate() != totals:
            raise RuntimeError("usage_totals does not match the seeded query logs")
        timings = {
            "store.usage(hot account): one primary-key lookup": await time_async(
                lambda: store.usage(HOT_ACCOUNT), requests
            ),
            "for contrast: SUM/COUNT over the hot account's query_logs": await time_async(
                raw_aggregate, max(10, requests // 10), warmup=2
            ),
        }
    finally:
        await engine.dispose()
    return timings, totals, totals.queries


def _table(timings: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| measurement | n | p50 ms | p95 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {what} | {s['n']:.0f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['max']:.2f} |"
        for what, s in timings.items()
    ]
    return lines


def _report(args: argparse.Namespace, seed_s: float, hot_rows: int, table: list[str]) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        "# /v1/usage with a large query-log table",
        "",
        f"- {args.rows:,} query_logs rows over {args.accounts:,} accounts; the measured account "
        f"holds {hot_rows:,} of them (seeded in {seed_s:.1f} s)",
        f"- PostgreSQL, loopback; gateway nilai {__version__} under uvicorn in-process; "
        f"Python {platform.python_version()} on {platform.machine()}; {when}",
        "- HTTP rows: sequential requests with keep-alive, after 10 warm-up requests; the stored "
        "key is cached by the gateway for a few seconds, so most requests skip the key lookup",
        "",
    ]
    return "\n".join([*header, *table, ""])


async def _prepare(url: str) -> str:
    engine = make_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    return url


async def _with_store[T](url: str, action: Callable[[SqlStore], Awaitable[T]]) -> T:
    engine = make_engine(url)
    try:
        return await action(SqlStore(engine))
    finally:
        await engine.dispose()


def main() -> None:
    """Seed, serve, measure, report, clean up."""
    args = _parse()
    name = asyncio.run(create_database(args.pg_dsn))
    host = args.pg_dsn.removeprefix("postgresql://")
    url = f"postgresql+asyncpg://{host}/{name}"
    _out(f"database {name}")
    try:
        asyncio.run(_prepare(url))
        seed_s = asyncio.run(seed(args.pg_dsn, name, args.rows, args.accounts))
        db_key = asyncio.run(_with_store(url, lambda store: add_key(store, HOT_ACCOUNT)))
        store_timings, totals, hot_rows = asyncio.run(measure_store(url, args.requests))
        settings_key = "bench-" + secrets.token_hex(16)
        with tempfile.TemporaryDirectory() as data_dir:
            settings = NilaiSettings(
                database_url=url,
                api_keys=[settings_key],
                data_dir=Path(data_dir),
                rate_limit_minute=0,
                rate_limit_hour=0,
                rate_limit_day=0,
            )
            with Server(settings) as server:
                http_timings = {
                    "GET /v1/usage, stored key of the hot account": time_http(
                        server.url, db_key, args.requests, totals
                    ),
                    "GET /v1/usage, settings key (no totals row)": time_http(
                        server.url, settings_key, args.requests, Usage()
                    ),
                }
        report = _report(args, seed_s, hot_rows, _table({**http_timings, **store_timings}))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        _out()
        _out(report)
        _out(f"written to {args.output}")
    finally:
        if args.keep:
            _out(f"kept database {name}")
        else:
            asyncio.run(drop_database(args.pg_dsn, name))


if __name__ == "__main__":
    main()
