"""Load benchmark: the real gateway, pinned to one core, against the fake model server directly.

Starts two fake model servers (instant tokens, and 20 ms per token), a throwaway PostgreSQL
database and one ``nilai api`` process per fake server, each gateway pinned to core 0 with the
whole pipeline on (API-key auth, Redis rate limits, routing, relay, signing, batched query logs).
Every scenario then alternates runs against the gateway and against its fake server directly,
from an httpx load generator in this process (pinned, with the fake servers, to the other
cores). Writes ``load.md`` (printed too), ``load.json`` and ``load.png`` to ``--out``; stops
everything it started, drops the database and deletes its Redis keys, also on Ctrl-C.

Run: ``python bench/load.py --out bench/results`` (``--quick`` for a short CI run). Needs
PostgreSQL on 127.0.0.1:5432 as ``postgres`` (``--pg-dsn``) and Redis (``--redis-url``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg
import redis
import uvloop
from loadbench import procs, report
from loadbench.chart import write_chart
from loadbench.runner import (
    Pair,
    Run,
    Scenario,
    burst_hold_s,
    measure_idle,
    run_scenario,
    scenarios,
)
from tqdm import tqdm

RESULTS = Path(__file__).with_name("results")
SLOW_TOKEN_S = 0.02
HIGH_LIMIT = "100000000"
FD_WANTED = 65536
GATEWAY_CORE = 0
LOG_PREFIX = re.compile(r"^\S+ \S+ ")  # the date and time of a log line
REQUEST_ID = re.compile(r"\[[0-9a-f]{32}\]")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for load.md/json/png")
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 1 s per target, 200-stream burst (CI)"
    )
    parser.add_argument("--rounds", type=int, help="gateway/direct alternations (default 2)")
    parser.add_argument("--duration", type=float, help="seconds per closed-loop run (default 4)")
    parser.add_argument("--slow-streams", type=int, help="streams in the burst (1000; quick 200)")
    parser.add_argument("--tokens", type=int, default=31, help="fake tokens (+1 content chunk)")
    parser.add_argument("--only", action="append", help="run only this scenario key (repeat)")
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get("NILAI_BENCH_PG", "postgresql://postgres@127.0.0.1:5432"),
        help="PostgreSQL server, without a database name",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.duration = args.duration or (1.0 if args.quick else 4.0)
    args.slow_streams = args.slow_streams or (200 if args.quick else 1000)
    return args


# the machine


def pin_cores(args: argparse.Namespace) -> None:
    """Keep core 0 for the gateways and pin this process to the rest (``taskset`` lists)."""
    cores = sorted(os.sched_getaffinity(0))
    if GATEWAY_CORE not in cores or len(cores) < 2:  # noqa: PLR2004 - needs a second core
        sys.exit(f"needs core {GATEWAY_CORE} and at least one more; allowed: {cores}")
    others = [core for core in cores if core != GATEWAY_CORE]
    os.sched_setaffinity(0, others)
    args.usable_cores = len(cores)
    args.gateway_core, args.other_cores = str(GATEWAY_CORE), ",".join(map(str, others))


def raise_fd_limit() -> None:
    """Allow thousands of sockets here and in the children (they inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_WANTED if hard == resource.RLIM_INFINITY else min(FD_WANTED, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# PostgreSQL and Redis


async def _admin(dsn: str, statement: str) -> None:
    """Run one statement on the server's ``postgres`` database."""
    conn = await asyncpg.connect(f"{dsn}/postgres")
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def create_database(dsn: str) -> str:
    """A new, empty database; returns its name."""
    name = f"nilai_load_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(dsn, f'CREATE DATABASE "{name}"'))
    return name


def drop_database(dsn: str, name: str) -> None:
    """Drop the database, ending any session still connected to it."""
    asyncio.run(_admin(dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _count_query_logs(dsn: str, name: str) -> int:
    conn = await asyncpg.connect(f"{dsn}/{name}")
    try:
        return int(await conn.fetchval("SELECT count(*) FROM query_logs"))
    finally:
        await conn.close()


def count_query_logs(dsn: str, name: str) -> int:
    """Rows the gateways wrote to ``query_logs``."""
    return asyncio.run(_count_query_logs(dsn, name))


def delete_redis_keys(url: str, prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.unlink(*keys)
        return len(keys)
    finally:
        client.close()


# set-up


def gateway_env(
    args: argparse.Namespace, name: str, upstream: str, db: str, data: Path
) -> dict[str, str]:
    """``NILAI_*`` settings: the whole pipeline on, limits checked but never reached."""
    return {
        "NILAI_UPSTREAM_URLS": upstream,
        "NILAI_API_KEY": args.api_key,
        "NILAI_DATA_DIR": str(data),
        "NILAI_DATABASE_URL": f"{args.pg_dsn.replace('postgresql://', 'postgresql+asyncpg://')}/{db}",
        "NILAI_REDIS_URL": args.redis_url,
        # One prefix per gateway: replicas on a prefix share discovery, and so each other's
        # model servers, so a shared prefix would mix the fast and the slow fake server.
        "NILAI_REDIS_PREFIX": f"{args.redis_prefix}{name}:",
        "NILAI_RATE_LIMIT_MINUTE": HIGH_LIMIT,
        "NILAI_RATE_LIMIT_HOUR": HIGH_LIMIT,
        "NILAI_RATE_LIMIT_DAY": HIGH_LIMIT,
        "NILAI_MODEL_CONCURRENCY": "2000",
        "NILAI_LOG_LEVEL": "warning",
    }


def start_pair(
    args: argparse.Namespace,
    stack: ExitStack,
    *,
    name: str,
    token_delay_s: float,
    db: str,
    tmp: Path,
) -> Pair:
    """A fake server and a gateway in front of it, both stopped when ``stack`` closes.

    Each stop is registered before the wait for readiness, so Ctrl-C while waiting stops it.
    """
    fake = procs.spawn_fake(f"fake-{name}", token_delay_s, args.other_cores, tmp)
    stack.callback(procs.stop, fake)
    procs.ready_fake(fake, args.tokens)
    data = tmp / f"gateway-{name}"
    data.mkdir()
    env = gateway_env(args, name, fake.url, db, data)
    gateway = procs.spawn_gateway(f"gateway-{name}", env, args.gateway_core, tmp)
    stack.callback(procs.stop, gateway)
    procs.ready_gateway(gateway, args.api_key)
    return Pair(fake, gateway, args.api_key)


def set_up(args: argparse.Namespace, stack: ExitStack) -> dict[str, Pair]:
    """Database, Redis prefix, fake servers and gateways; cleanups registered on ``stack``."""
    db = args.db = create_database(args.pg_dsn)
    stack.callback(drop_database, args.pg_dsn, db)
    stack.callback(delete_redis_keys, args.redis_url, args.redis_prefix)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nilai-load-")))
    args.logs = tmp
    fast = start_pair(args, stack, name="fast", token_delay_s=0.0, db=db, tmp=tmp)
    slow = start_pair(args, stack, name="slow", token_delay_s=SLOW_TOKEN_S, db=db, tmp=tmp)
    return {"fast": fast, "slow": slow}


# the runs


def plan(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios to run (``--only`` filters them)."""
    chosen = scenarios(args.slow_streams)
    if args.only:
        chosen = [scenario for scenario in chosen if scenario.key in args.only]
    return chosen


def run_count(args: argparse.Namespace, chosen: list[Scenario]) -> int:
    """Runs in total, for the progress bar (the burst runs once per target)."""
    return sum(2 * (1 if scenario.burst else args.rounds) for scenario in chosen)


async def run_all(
    args: argparse.Namespace, pairs: dict[str, Pair], chosen: list[Scenario]
) -> list[Run]:
    """Every scenario, in order, with a progress bar over the runs."""
    await measure_idle(list(pairs.values()))
    runs: list[Run] = []
    with tqdm(total=run_count(args, chosen), unit="run", file=sys.stderr) as bar:
        for scenario in chosen:
            pair = pairs["slow" if scenario.slow else "fast"]
            rounds = 1 if scenario.burst else args.rounds
            runs += await run_scenario(pair, scenario, rounds, args.duration, bar)
    return runs


# the report


def log_findings(tmp: Path, out: Path) -> list[str]:
    """Copy the services' logs to ``out/load-logs`` and summarize what the gateways logged."""
    keep = out / "load-logs"
    keep.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    for log in sorted(tmp.glob("*.log")):
        shutil.copy(log, keep / log.name)
        if log.stem.startswith("gateway-"):
            notes.append(_log_summary(log))
    return notes


def _log_summary(log: Path) -> str:
    """``name: N lines`` and the most frequent messages, timestamps and ids left out."""
    messages: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if line.strip() and not line.startswith((" ", "Traceback")):
            messages[REQUEST_ID.sub("[id]", LOG_PREFIX.sub("", line))[:160]] += 1
    top = "; ".join(f"{count} x `{text}`" for text, count in messages.most_common(3))
    return (
        f"`{log.name}`: {messages.total()} log lines (warning level). Most frequent: {top or '-'}"
    )


def query_log_note(args: argparse.Namespace, pairs: dict[str, Pair]) -> str:
    """Whether every chat request reached PostgreSQL (the last run's settle covers its flush)."""
    written = count_query_logs(args.pg_dsn, args.db)
    sent = sum(pair.chat_requests for pair in pairs.values())
    return (
        f"Query logs in PostgreSQL: {written:,} rows for {sent:,} chat requests sent to the "
        "gateways (warm-ups included)."
    )


def header(args: argparse.Namespace, pairs: dict[str, Pair], load_start: str) -> list[str]:
    """Lines about the machine and the method, for the top of the report."""
    mode = "quick" if args.quick else "full"
    burst = scenarios(args.slow_streams)[-1]
    idle = ", ".join(f"{name} {pair.idle_cpu_per_s * 1000:.1f}" for name, pair in pairs.items())
    return [
        f"Machine: {os.cpu_count()} cores ({procs.cpu_model()}), {args.usable_cores} usable here; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
        f"nilai {version('nilai')}",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; mode: {mode} ({args.rounds} round(s) of "
        f"{args.duration:g} s per target, gateway and direct alternating; the burst runs once)",
        f"Gateway: one `nilai api` process **pinned to core {args.gateway_core} with `taskset`**, "
        "uvicorn, API-key auth, Redis rate limits (checked, set to 100,000,000 so they never "
        "refuse), routing, relay, signing, batched query logs to a throwaway PostgreSQL database; "
        "NILAI_MODEL_CONCURRENCY=2000",
        f"Load generator (httpx.AsyncClient, this process) and fake model servers: pinned to "
        f"core(s) {args.other_cores}",
        f"Streams: `stream_options.include_usage`; {args.tokens + 1} content chunks each (the "
        f"fake server's `tokens` set to {args.tokens} over `POST /_control`), "
        f"{args.tokens + 4} SSE data events in all (role, content, finish, usage) plus `[DONE]`",
        "20 ms/token scenarios: a second fake server (`--token-delay 0.02`) with its own gateway "
        f"(same settings and core, its own Redis prefix so discovery keeps them apart), both "
        f"started up front; idle gateway CPU (ms/s): {idle}",
        f"Burst: {args.slow_streams:,} streams sent at once; the 20 ms/token fake server holds "
        f"each first byte {burst_hold_s(burst):g} s (`first_byte_delay_s`, set over "
        "`POST /_control` for the burst only) so that all are open together before tokens flow; "
        "the burst's latency and TTFT include that hold",
        f"Load average at start: {load_start}; at end: {procs.load_average()}",
    ]


NOTES = [
    "Gateway CPU ms/req: user+sys of the gateway's process tree (/proc/<pid>/stat utime+stime, "
    "children included) over the run plus a 1.3 s settle for the last query-log flush, minus its "
    "idle rate, divided by the requests of that run (the kernel counts in 10 ms ticks). "
    "PostgreSQL and Redis server CPU is not in it.",
    "Peak RSS: VmHWM, reset with /proc/<pid>/clear_refs at the start of each run (and sampled "
    "VmRSS as a backup). +p50 / +TTFT p50: gateway minus direct, same scenario, rounds merged. "
    "TTFT: time to the first chunk with non-empty `delta.content`.",
    "req/s is bounded by the load generator and fake server sharing the other core (see the "
    "direct rows and the last two columns), so a gateway row near its direct row is not "
    "gateway-bound; 1000 ÷ gateway CPU ms/req is what one core of gateway could serve.",
]


def write_outputs(
    args: argparse.Namespace, meta: dict[str, Any], chosen: list[Scenario], runs: list[Run]
) -> str:
    """Write load.md, load.json and load.png; return the markdown."""
    table = report.summarize_all(chosen, runs)
    checks = report.verdicts(table)
    markdown = report.render_markdown(meta, table, checks)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.md").write_text(markdown)
    document = report.to_json(meta, table, checks, runs)
    (args.out / "load.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    write_chart(args.out / "load.png", table, f"{meta['mode']}, {meta['date']}")
    return markdown


def benchmark(args: argparse.Namespace) -> str:
    """Set up, run, report; everything started is stopped before this returns or raises."""
    started, load_start = time.perf_counter(), procs.load_average()
    pin_cores(args)
    args.api_key = f"bench-{secrets.token_urlsafe(24)}"
    args.redis_prefix = f"nilai-load-{uuid.uuid4().hex[:12]}:"
    chosen = plan(args)
    with ExitStack() as stack:
        sys.stderr.write("starting fake model servers and gateways...\n")
        pairs = set_up(args, stack)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runs = runner.run(run_all(args, pairs, chosen))
        meta: dict[str, Any] = {
            "header": header(args, pairs, load_start),
            "notes": [*NOTES, query_log_note(args, pairs), *log_findings(args.logs, args.out)],
            "mode": "quick" if args.quick else "full",
            "date": f"{datetime.now(UTC):%Y-%m-%d}",
            "args": {key: str(value) for key, value in vars(args).items() if key != "api_key"},
        }
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    return write_outputs(args, meta, chosen, runs)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the benchmark and print the markdown report."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM as on Ctrl-C
    args = parse(argv)
    raise_fd_limit()
    try:
        markdown = benchmark(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; everything started was stopped and removed\n")
        return 130
    sys.stdout.write(markdown + "\n")
    sys.stdout.write(f"Written to {args.out}/load.md, load.json and load.png\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
