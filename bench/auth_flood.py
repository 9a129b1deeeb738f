"""Random stored-shape API keys against a real gateway on PostgreSQL: what does a flood cost?

Creates a throwaway PostgreSQL database with a few tenants and their stored keys, starts a fake
model server and one ``nilai api`` on that database (pinned to core 0; this load generator and
the fake on the other cores), then runs four phases, each followed by a quiet pause so that
PostgreSQL has flushed its per-database counters:

1. ``legit``: a few closed-loop clients with valid stored keys, alone;
2. ``flood+legit``: the same clients while ``--flood`` requests with random keys of the stored
   shape (``nilai_<12 hex>_<secret>``) are sent at concurrency ``--concurrency``;
3. ``flood``: the flood alone;
4. ``flood-static``: the same flood with random keys not of the stored shape (they never reach
   the database): the floor of what a refused request costs the gateway.

For each phase it reports the transactions the gateway made on the database (the
``xact_commit`` and ``xact_rollback`` deltas of ``pg_stat_database``), the answers' statuses,
the legitimate requests' median and p95 latency, and the gateway's CPU time per request (from
``/proc``: steadier than latency on a busy machine). Prints a markdown table and writes it to
``bench/results/auth_flood.md``; stops what it started and drops the database, also on Ctrl-C.

Run: ``.venv/bin/python bench/auth_flood.py`` (``--flood 2000 --concurrency 50``). To measure
another checkout's gateway, put its ``src`` first: ``PYTHONPATH=/path/to/old/src``. Not run in
CI: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
from loadbench import procs
from loadbench.report import publish

import nilai
from nilai.auth.stored_keys import KEY_MARK, generate_key
from nilai.store.base import ApiKey
from nilai.store.migrate import upgrade
from nilai.store.sql import SqlStore, make_engine, new_id, now

RESULTS = Path(__file__).with_name("results") / "auth_flood.md"
GATEWAY_CORE = "0"
STATS_FLUSH_S = 11.0  # PostgreSQL flushes an idle backend's counters within 10 s
HTTP_OK = 200
PHASES = ("legit", "flood+legit", "flood", "flood-static")
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "ping"}]}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--flood", type=int, default=2000, help="requests with random keys")
    parser.add_argument("--concurrency", type=int, default=50, help="flood requests at once")
    parser.add_argument("--legit", type=int, default=4, help="legitimate clients (one key each)")
    parser.add_argument("--legit-s", type=float, default=10.0, help="length of the legit phase")
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get("NILAI_BENCH_PG", "postgresql://postgres@127.0.0.1:5432"),
        help="PostgreSQL server, without a database name",
    )
    parser.add_argument(
        "--phase", action="append", choices=PHASES, help="run only this phase (repeat)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    seconds: float = 0.0
    commits: int = 0
    rollbacks: int = 0
    gateway_cpu_s: float = 0.0
    legit_ms: list[float] = field(default_factory=list)
    legit_status: Counter[int] = field(default_factory=Counter[int])
    flood_status: Counter[int] = field(default_factory=Counter[int])

    def row(self) -> str:
        """One markdown table row."""
        ms = sorted(self.legit_ms)
        median = f"{statistics.median(ms):.1f}" if ms else "-"
        p95 = f"{ms[int(0.95 * (len(ms) - 1))]:.1f}" if ms else "-"
        flood = " ".join(f"{code} x{n}" for code, n in sorted(self.flood_status.items())) or "-"
        legit = " ".join(f"{code} x{n}" for code, n in sorted(self.legit_status.items())) or "-"
        requests = self.flood_status.total() + self.legit_status.total()
        cpu_ms = self.gateway_cpu_s * 1000 / max(1, requests)
        return (
            f"| {self.name} | {self.seconds:.1f} | {self.commits} | {self.rollbacks} | "
            f"{self.commits + self.rollbacks} | {flood} | {legit} | {median} | {p95} | "
            f"{cpu_ms:.2f} |"
        )


async def admin(dsn: str, statement: str) -> None:
    """Run one statement on the server's ``postgres`` database."""
    conn = await asyncpg.connect(f"{dsn}/postgres")
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def transactions(dsn: str, name: str) -> tuple[int, int]:
    """``(xact_commit, xact_rollback)`` of database ``name`` (flushed counters only)."""
    conn = await asyncpg.connect(f"{dsn}/postgres")
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1", name
        )
    finally:
        await conn.close()
    if row is None:
        raise RuntimeError(f"no statistics for database {name}")
    return int(row[0]), int(row[1])


async def create_keys(url: str, count: int) -> list[str]:
    """Migrate, then make ``count`` accounts with one stored key each; returns the keys."""
    engine = make_engine(url)
    store = SqlStore(engine)
    values: list[str] = []
    try:
        await upgrade(engine)
        for n in range(count):
            account = await store.create_account(f"bench-{n}", {})
            made = generate_key()
            record = ApiKey(
                new_id("key"), account.id, made.prefix, made.hash, "bench", now(), None, None
            )
            await store.add_key(record)
            values.append(made.value)
    finally:
        await engine.dispose()
    return values


def random_key(*, stored_shape: bool = True) -> str:
    """A key of the stored shape that no database holds (or, if not, of no known shape)."""
    if not stored_shape:
        return f"sk-{secrets.token_urlsafe(40)}"
    return f"{KEY_MARK}{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


async def legit_loop(
    client: httpx.AsyncClient, key: str, phase: Phase, stop: asyncio.Event
) -> None:
    """Chat with a valid key, one request at a time, until ``stop``."""
    headers = {"Authorization": f"Bearer {key}"}
    while not stop.is_set():
        started = time.perf_counter()
        answer = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        phase.legit_status[answer.status_code] += 1
        if answer.status_code == HTTP_OK:
            phase.legit_ms.append((time.perf_counter() - started) * 1000)


async def flood(
    client: httpx.AsyncClient, count: int, concurrency: int, phase: Phase, *, stored_shape: bool
) -> None:
    """``count`` chat requests with random keys, ``concurrency`` at a time."""
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            headers = {"Authorization": f"Bearer {random_key(stored_shape=stored_shape)}"}
            answer = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
            phase.flood_status[answer.status_code] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run_phase(
    args: argparse.Namespace, gateway: procs.Service, db: str, keys: list[str], name: str
) -> Phase:
    """One phase: legit clients and/or the flood; counts the database's transactions."""
    phase = Phase(name)
    url = gateway.url
    limits = httpx.Limits(max_connections=args.concurrency + args.legit + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.sleep(STATS_FLUSH_S)
        before = await transactions(args.pg_dsn, db)
        cpu_before = procs.cpu_seconds(procs.descendants(gateway.pid))
        started = time.perf_counter()
        stop = asyncio.Event()
        legit = (
            [asyncio.create_task(legit_loop(client, key, phase, stop)) for key in keys]
            if "legit" in name
            else []
        )
        if "flood" in name:
            stored_shape = not name.endswith("static")
            await flood(client, args.flood, args.concurrency, phase, stored_shape=stored_shape)
        else:
            await asyncio.sleep(args.legit_s)
        stop.set()
        await asyncio.gather(*legit)
        phase.seconds = time.perf_counter() - started
        phase.gateway_cpu_s = procs.cpu_seconds(procs.descendants(gateway.pid)) - cpu_before
        await asyncio.sleep(STATS_FLUSH_S)
        after = await transactions(args.pg_dsn, db)
    phase.commits, phase.rollbacks = after[0] - before[0], after[1] - before[1]
    return phase


def benchmark(args: argparse.Namespace) -> str:
    """Set up, run the four phases, tear down; returns the markdown report."""
    others = {cpu for cpu in os.sched_getaffinity(0) if cpu != int(GATEWAY_CORE)}
    if others:
        os.sched_setaffinity(0, others)
    db = f"nilai_bench_auth_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin(args.pg_dsn, f'CREATE DATABASE "{db}"'))
    fake = gateway = None
    try:
        db_url = f"{args.pg_dsn.replace('postgresql://', 'postgresql+asyncpg://')}/{db}"
        keys = asyncio.run(create_keys(db_url, args.legit))
        with tempfile.TemporaryDirectory(prefix="nilai-auth-flood-") as tmp:
            logs = Path(tmp)
            spare = ",".join(str(cpu) for cpu in sorted(others)) or GATEWAY_CORE
            fake = procs.spawn_fake("fake", 0.0, spare, logs)
            procs.ready_fake(fake, tokens=8)
            env = {
                "NILAI_UPSTREAM_URLS": fake.url,
                "NILAI_DATA_DIR": str(logs / "data"),
                "NILAI_DATABASE_URL": db_url,
                "NILAI_RATE_LIMIT_MINUTE": "0",
                "NILAI_RATE_LIMIT_HOUR": "0",
                "NILAI_RATE_LIMIT_DAY": "0",
                "NILAI_MODEL_CONCURRENCY": "1000",
                "NILAI_LOG_LEVEL": "error",
            }
            gateway = procs.spawn_gateway("gateway", env, GATEWAY_CORE, logs)
            procs.ready_gateway(gateway, keys[0])
            phases = [
                asyncio.run(run_phase(args, gateway, db, keys, name))
                for name in args.phase or PHASES
            ]
    finally:
        for service in (gateway, fake):
            if service is not None:
                procs.stop(service)
        asyncio.run(admin(args.pg_dsn, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    lines = [
        f"# Random stored-shape keys: nilai from {Path(nilai.__file__).parent}",
        "",
        f"{args.flood} flood requests at concurrency {args.concurrency}; {args.legit} legit "
        f"closed-loop clients; gateway pinned to core {GATEWAY_CORE}; Python "
        f"{sys.version.split()[0]}; load average {procs.load_average()}.",
        "",
        "| phase | s | xact_commit | xact_rollback | transactions | flood answers "
        "| legit answers | legit p50 ms | legit p95 ms | gateway CPU ms/request |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(phase.row() for phase in phases),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run and report."""
    args = parse(argv)
    publish(benchmark(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
