"""Load benchmark: the real gateway, pinned to one core, against the fake model server directly.

Starts a fake model server, a throwaway PostgreSQL database and one ``nilai api`` process in
front of it, pinned to core 0 with the whole pipeline on (API-key auth, Redis rate limits,
routing, relay, signing, batched query logs). Every scenario then alternates runs against the
gateway and against the fake server directly, from an aiohttp load generator in this process
(pinned, with the fake server, to the other cores); each scenario sets the fake's stream length
and pace (tokens one per write at 20 or 2 ms apart, or all at once) over its ``POST /_control``.
The multicore scenario starts a second gateway, ``nilai api --workers 2`` on two cores, for
itself. Writes ``load.md`` (printed too), ``load.json`` and ``load.png`` to ``--out``; stops
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
    BURST_ARRIVALS_PER_S,
    LONG_TOKENS,
    OPTIONAL,
    SHORT_TOKENS,
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
HIGH_LIMIT = "100000000"
FD_WANTED = 65536
STREAM_TIMEOUT_S = 600
GATEWAY_CORE = 0
MULTI_WORKERS = 2
# Connections, upstream connections and model slots the gateway may hold beyond the burst.
CONNECTION_HEADROOM = 1024
MIN_CONNECTIONS = 2048
WORKERS_START_S = 3.0  # after the first worker answers, for the others to finish starting
LOG_PREFIX = re.compile(r"^\S+ \S+ ")  # the date and time of a log line
REQUEST_ID = re.compile(r"\[[0-9a-f]{32}\]")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for load.md/json/png")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 1 s per target, 200-stream burst, no multicore scenario (CI)",
    )
    parser.add_argument("--rounds", type=int, help="gateway/direct alternations (default 2)")
    parser.add_argument("--duration", type=float, help="seconds per closed-loop run (default 4)")
    parser.add_argument("--slow-streams", type=int, help="streams in the burst (5000; quick 200)")
    parser.add_argument(
        "--burst-rate",
        type=float,
        default=BURST_ARRIVALS_PER_S,
        help=f"burst streams started per second (default {BURST_ARRIVALS_PER_S:g}; 0: at once)",
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=LONG_TOKENS,
        help=f"tokens of the long streams of the per-token slope (default {LONG_TOKENS})",
    )
    parser.add_argument(
        "--only",
        action="append",
        help="run only this scenario key (repeat); `--only multicore` runs plain-c32 too",
    )
    parser.add_argument("--skip", action="append", default=[], help="leave out this scenario")
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get("NILAI_BENCH_PG", "postgresql://postgres@127.0.0.1:5432"),
        help="PostgreSQL server, without a database name",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.duration = args.duration or (1.0 if args.quick else 4.0)
    args.slow_streams = args.slow_streams or (200 if args.quick else 5000)
    if args.long_tokens <= SHORT_TOKENS:
        parser.error(f"--long-tokens must be above {SHORT_TOKENS}")
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
    # The multicore scenario: gateway workers on the first two cores, the load generator and
    # fake server on the rest, or sharing the second core when there is no third.
    args.multi_cores = cores[:MULTI_WORKERS]
    args.multi_others = cores[MULTI_WORKERS:] or cores[MULTI_WORKERS - 1 :]


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
        # Room for the whole burst: client connections, upstream connections, model slots.
        "NILAI_MODEL_CONCURRENCY": str(connections(args)),
        "NILAI_MAX_CONNECTIONS": str(connections(args)),
        "NILAI_UPSTREAM_MAX_CONNECTIONS": str(connections(args)),
        # The burst holds first bytes for over a minute (every stream open before any token):
        # the default 60 s first-token limit would end the earliest streams in-band.
        "NILAI_STREAM_FIRST_BYTE_TIMEOUT_S": str(STREAM_TIMEOUT_S),
        "NILAI_UPSTREAM_READ_TIMEOUT_S": str(STREAM_TIMEOUT_S),
        "NILAI_REQUEST_TIMEOUT_S": str(STREAM_TIMEOUT_S),
        "NILAI_LOG_LEVEL": "warning",
    }


def connections(args: argparse.Namespace) -> int:
    """The gateway's connection and model-slot limits: the burst and some headroom."""
    return max(MIN_CONNECTIONS, args.slow_streams + CONNECTION_HEADROOM)


def start_gateway(
    args: argparse.Namespace,
    stack: ExitStack,
    fake: procs.Service,
    *,
    name: str,
    cpus: str,
    workers: int = 1,
) -> Pair:
    """A gateway in front of ``fake``, stopped when ``stack`` closes (or before, by the caller).

    The stop is registered before the wait for readiness, so Ctrl-C while waiting stops it.
    """
    data = args.logs / f"gateway-{name}"
    data.mkdir()
    env = gateway_env(args, name, fake.url, args.db, data)
    gateway = procs.spawn_gateway(f"gateway-{name}", env, cpus, args.logs, workers=workers)
    stack.callback(procs.stop, gateway)
    procs.ready_gateway(gateway, args.api_key)
    return Pair(fake, gateway, args.api_key)


def set_up(args: argparse.Namespace, stack: ExitStack) -> Pair:
    """Database, Redis prefix, fake server and gateway; cleanups registered on ``stack``."""
    args.db = create_database(args.pg_dsn)
    stack.callback(drop_database, args.pg_dsn, args.db)
    stack.callback(delete_redis_keys, args.redis_url, args.redis_prefix)
    args.logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nilai-load-")))
    fake = procs.spawn_fake("fake", 0.0, args.other_cores, args.logs)
    stack.callback(procs.stop, fake)
    procs.ready_fake(fake, SHORT_TOKENS - 1)
    return start_gateway(args, stack, fake, name="main", cpus=args.gateway_core)


# the runs


def plan(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios to run, in order.

    ``--only`` picks, ``--skip`` drops, and quick mode leaves out the ``OPTIONAL`` ones unless
    named. The multicore scenario brings ``plain-c32``, its one-worker reference.
    """
    chosen = scenarios(args.slow_streams, long_tokens=args.long_tokens, burst_rate=args.burst_rate)
    wanted = set(args.only or [])
    if "multicore" in wanted:
        wanted.add("plain-c32")
    if wanted:
        unknown = wanted - {scenario.key for scenario in chosen}
        if unknown:
            sys.exit(f"unknown scenario(s): {sorted(unknown)}; known: {[s.key for s in chosen]}")
        chosen = [scenario for scenario in chosen if scenario.key in wanted]
    elif args.quick:
        chosen = [scenario for scenario in chosen if scenario.key not in OPTIONAL]
    return [scenario for scenario in chosen if scenario.key not in args.skip]


def run_count(args: argparse.Namespace, chosen: list[Scenario]) -> int:
    """Runs in total, for the progress bar (the burst runs once per target)."""
    return sum(2 * (1 if scenario.burst else args.rounds) for scenario in chosen)


def _pin(pids: list[int], cores: list[int]) -> None:
    for pid in pids:
        os.sched_setaffinity(pid, cores)


async def run_multicore(
    args: argparse.Namespace, main: Pair, scenario: Scenario, bar: tqdm
) -> list[Run]:
    """The scenario against ``nilai api --workers 2`` on two cores, started for it alone.

    This process and the fake server move to the cores left over (on a two-core machine they
    share the second core with a worker), and move back afterwards.
    """
    cores = ",".join(map(str, args.multi_cores))
    with ExitStack() as stack:
        pair = start_gateway(
            args, stack, main.fake, name="multi", cpus=cores, workers=scenario.workers
        )
        await asyncio.sleep(WORKERS_START_S)
        loader_and_fake = [0, *procs.descendants(main.fake.pid)]
        _pin(loader_and_fake, args.multi_others)
        try:
            await measure_idle([pair])
            runs = await run_scenario(pair, scenario, args.rounds, args.duration, bar)
        finally:
            _pin(loader_and_fake, [int(core) for core in args.other_cores.split(",")])
        args.multi_idle_ms_per_s = pair.idle_cpu_per_s * 1000
        main.chat_requests += pair.chat_requests
    return runs


async def run_all(args: argparse.Namespace, main: Pair, chosen: list[Scenario]) -> list[Run]:
    """Every scenario, in order, with a progress bar over the runs."""
    await measure_idle([main])
    runs: list[Run] = []
    with tqdm(total=run_count(args, chosen), unit="run", file=sys.stderr) as bar:
        for scenario in chosen:
            if scenario.workers > 1:
                runs += await run_multicore(args, main, scenario, bar)
                continue
            rounds = 1 if scenario.burst else args.rounds
            runs += await run_scenario(main, scenario, rounds, args.duration, bar)
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


def query_log_note(args: argparse.Namespace, main: Pair) -> str:
    """Whether every chat request reached PostgreSQL (the last run's settle covers its flush)."""
    written = count_query_logs(args.pg_dsn, args.db)
    return (
        f"Query logs in PostgreSQL: {written:,} rows for {main.chat_requests:,} chat requests sent "
        "to the gateways (warm-ups included)."
    )


def header(
    args: argparse.Namespace, main: Pair, chosen: list[Scenario], load_start: str
) -> list[str]:
    """Lines about the machine and the method, for the top of the report."""
    mode = "quick" if args.quick else "full"
    keys = {scenario.key for scenario in chosen}
    lines = [
        f"Machine: {os.cpu_count()} cores ({procs.cpu_model()}), {args.usable_cores} usable here; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
        f"nilai {version('nilai')}",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; mode: {mode} ({args.rounds} round(s) of "
        f"{args.duration:g} s per target, gateway and direct alternating; the burst runs once); "
        f"scenarios: {', '.join(f'`{scenario.key}`' for scenario in chosen)}",
        f"Gateway: one `nilai api` process **pinned to core {args.gateway_core} with `taskset`**, "
        "uvicorn, API-key auth, Redis rate limits (checked, set to 100,000,000 so they never "
        "refuse), routing, relay, signing, batched query logs to a throwaway PostgreSQL database; "
        f"NILAI_MODEL_CONCURRENCY, NILAI_MAX_CONNECTIONS and NILAI_UPSTREAM_MAX_CONNECTIONS "
        f"{connections(args):,} (room for the burst); idle CPU "
        f"{main.idle_cpu_per_s * 1000:.1f} ms/s, subtracted",
        f"Load generator (aiohttp client, this process) and the fake model server (one uvicorn "
        f"process): pinned to core(s) {args.other_cores}",
        f"Streams: `stream_options.include_usage`; {SHORT_TOKENS} content chunks (tokens) each "
        f"unless the scenario says otherwise, {SHORT_TOKENS + 3} SSE data events in all (role, "
        "content, finish, usage) plus `[DONE]`. Each scenario sets the fake server's `tokens` "
        "and `token_delay_s` over `POST /_control` for its measured runs (warm-ups run without "
        "delay). With a delay the fake writes each token on its own, so it reaches the gateway "
        "in a read of its own (see the reads/stream column: about one read per token on the "
        "direct rows); without one the tokens run together into a few reads",
    ]
    if any(scenario.key.startswith("tok") for scenario in chosen):
        lines.append(
            f"Per-token cost: gateway CPU per stream at {SHORT_TOKENS} and {args.long_tokens} "
            "tokens, same pace and concurrency (`real-c32` with `tok20-*`, `tok2-*` with each "
            "other); the slope is the CPU per additional relayed token, the intercept the fixed "
            "cost of a stream"
        )
    if "multicore" in keys:
        shared = args.multi_others[0] in args.multi_cores
        lines.append(
            f"Multicore: `nilai api --workers {MULTI_WORKERS}` pinned to cores "
            f"{','.join(map(str, args.multi_cores))} (idle CPU "
            f"{getattr(args, 'multi_idle_ms_per_s', 0.0):.1f} ms/s, subtracted), compared with "
            f"the one-worker gateway of `plain-c32`; load generator and fake server on core(s) "
            f"{','.join(map(str, args.multi_others))}"
            + (
                ": **on this machine they share a core with a gateway worker**, so the measured "
                "scaling is a lower bound; the CPU-per-request comparison shows what dedicated "
                "cores would give"
                if shared
                else ""
            )
        )
    if "slow-burst" in keys:
        burst = next(scenario for scenario in chosen if scenario.key == "slow-burst")
        sent = (
            f"started {args.burst_rate:g} a second (over {burst.spread_s:g} s)"
            if burst.arrivals_per_s
            else "sent at once"
        )
        lines.append(
            f"Burst: {args.slow_streams:,} streams at 20 ms/token, {sent}; the fake server holds "
            f"every first byte until {burst_hold_s(burst):g} s after the first request "
            "(`first_byte_at`, set for the burst only), so that all are open together and "
            "tokens flow only once all are in; latency and TTFT include that hold, req/s and "
            "tokens/s the whole burst"
        )
    lines.append(f"Load average at start: {load_start}; at end: {procs.load_average()}")
    return lines


NOTES = [
    "Gateway CPU ms/req: user+sys of the gateway's process tree (/proc/<pid>/stat utime+stime, "
    "children included) over the run plus a 1.3 s settle for the last query-log flush, minus its "
    "idle rate, divided by the requests of that run (the kernel counts in 10 ms ticks). "
    "PostgreSQL and Redis server CPU is not in it.",
    "Peak RSS: VmHWM, reset with /proc/<pid>/clear_refs at the start of each run (and sampled "
    "VmRSS as a backup). +p50 / +TTFT p50: gateway minus direct, same scenario, rounds merged. "
    "TTFT: time to the first chunk with non-empty `delta.content`.",
    "req/s and tokens/s are bounded by the load generator and fake server sharing the other "
    "core (see the direct rows and the last two columns), so a gateway row near its direct row "
    "is not gateway-bound; 1000 ÷ gateway CPU ms/req is what one core of gateway could serve.",
    "tokens/s: content and other data chunks received per second (each chunk of the fake "
    "server carries one token); x direct: the gateway's tokens/s (req/s for non-streaming) over "
    "the direct run's. reads/stream: socket reads that delivered body bytes to the load "
    "generator, per request.",
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
        sys.stderr.write("starting the fake model server and the gateway...\n")
        main = set_up(args, stack)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runs = runner.run(run_all(args, main, chosen))
        meta: dict[str, Any] = {
            "header": header(args, main, chosen, load_start),
            "notes": [*NOTES, query_log_note(args, main), *log_findings(args.logs, args.out)],
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
