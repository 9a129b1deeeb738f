"""Scenarios, and one timed run of a scenario against one target with its resource readings."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from tqdm import tqdm

from loadbench import client, procs
from loadbench.client import Outcome, Target

GATEWAY, DIRECT = "gateway", "direct"
SETTLE_S = 1.3  # past the gateway's 1 s query-log flush, so the run's inserts are counted
SAMPLE_S = 0.25
WARM_UP_MAX = 256
IDLE_PROBE_S = 2.0
STREAMS_GAUGE = "nilai_chat_streams_in_flight "
STREAMS_SAMPLE_S = 1.0
# The burst's fake server holds every stream's first byte until one moment, after every
# request is in, so that all streams are open together and tokens flow only once the gateway has
# admitted them all: the arrivals' spread, then this long per stream for the gateway to catch up
# (it admits a few hundred a second; all at once needs more).
HOLD_PER_STREAM_S = 0.004
HOLD_PER_STREAM_AT_ONCE_S = 0.01
MIN_HOLD_S = 2.0
# Below what one core admits, so that a thundering herd of connections is not what is measured
# (``--burst-rate 0`` sends them all at once).
BURST_ARRIVALS_PER_S = 100.0
SHORT_TOKENS = 32  # content chunks of a stream: "32-token stream"
LONG_TOKENS = 256  # the long streams of the per-token slope
REAL_DELAY_S = 0.02  # a GPU model server's pace per stream: 50 tokens/s
FAST_DELAY_S = 0.002
# Scenarios left out of quick mode unless named with --only (they start extra processes).
OPTIONAL = frozenset({"multicore"})


@dataclass(frozen=True, slots=True)
class Scenario:
    """One load shape: request kind, concurrency, and how the fake model server answers.

    ``tokens`` content chunks per stream (one word each, the fake's ``tokens`` + 1), written
    ``token_delay_s`` apart: with a delay each token is its own write, so it reaches the
    gateway in a read of its own; with none they run together into a few reads.
    """

    key: str
    title: str
    stream: bool
    concurrency: int
    token_delay_s: float = 0.0
    tokens: int = SHORT_TOKENS
    burst: bool = False
    arrivals_per_s: float = 0.0
    """The burst's requests start this many a second (0: all at once)."""
    workers: int = 1  # gateway worker processes (``nilai api --workers``)

    @property
    def spread_s(self) -> float:
        """How long the burst's requests take to start."""
        return self.concurrency / self.arrivals_per_s if self.arrivals_per_s else 0.0

    def fake_settings(self) -> dict[str, Any]:
        """The fake server's ``POST /_control`` fields for a measured run that starts now."""
        return {
            "tokens": self.tokens - 1,
            "token_delay_s": self.token_delay_s,
            "first_byte_at": time.time() + burst_hold_s(self) if self.burst else 0.0,
        }


# What the fake serves between measured runs (warm-ups included): fast, short streams.
FAKE_DEFAULTS: dict[str, Any] = {
    "tokens": SHORT_TOKENS - 1,
    "token_delay_s": 0.0,
    "first_byte_at": 0.0,
}


def burst_hold_s(scenario: Scenario) -> float:
    """How long after the burst's start the fake server releases every stream's first byte."""
    per_stream = HOLD_PER_STREAM_S if scenario.arrivals_per_s else HOLD_PER_STREAM_AT_ONCE_S
    return scenario.spread_s + max(MIN_HOLD_S, scenario.concurrency * per_stream)


def scenarios(
    slow_streams: int,
    *,
    long_tokens: int = LONG_TOKENS,
    burst_rate: float = BURST_ARRIVALS_PER_S,
) -> list[Scenario]:
    """The scenarios in the order they run."""
    ms20, ms2 = REAL_DELAY_S, FAST_DELAY_S
    return [
        Scenario("plain-c1", "non-streaming, c=1", stream=False, concurrency=1),
        Scenario("plain-c32", "non-streaming, c=32", stream=False, concurrency=32),
        Scenario(
            "multicore", "non-streaming, c=32, 2 workers", stream=False, concurrency=32, workers=2
        ),
        Scenario("stream-c1", "streaming, c=1", stream=True, concurrency=1),
        Scenario("stream-c32", "streaming, c=32", stream=True, concurrency=32),
        Scenario("real-c32", "20 ms/token, 32 streams", True, 32, token_delay_s=ms20),
        Scenario("real-c256", "20 ms/token, 256 streams", True, 256, token_delay_s=ms20),
        Scenario(
            f"tok20-t{long_tokens}",
            f"20 ms/token, {long_tokens} tokens, 32 streams",
            True,
            32,
            token_delay_s=ms20,
            tokens=long_tokens,
        ),
        Scenario(f"tok2-t{SHORT_TOKENS}", "2 ms/token, 8 streams", True, 8, token_delay_s=ms2),
        Scenario(
            f"tok2-t{long_tokens}",
            f"2 ms/token, {long_tokens} tokens, 8 streams",
            True,
            8,
            token_delay_s=ms2,
            tokens=long_tokens,
        ),
        Scenario(
            "slow-burst",
            f"20 ms/token, {slow_streams:,} streams open together"
            + (f" (arriving {burst_rate:g}/s)" if burst_rate else " (sent at once)"),
            stream=True,
            concurrency=slow_streams,
            token_delay_s=ms20,
            burst=True,
            arrivals_per_s=burst_rate,
        ),
    ]


@dataclass(slots=True)
class Pair:
    """A fake model server and the gateway that relays to it."""

    fake: procs.Service
    gateway: procs.Service
    api_key: str
    idle_cpu_per_s: float = 0.0
    chat_requests: int = 0  # sent to the gateway, warm-ups included (each one is logged)

    def target(self, name: str) -> Target:
        """The gateway, or the fake server directly (no key needed)."""
        if name == GATEWAY:
            headers = {"Authorization": f"Bearer {self.api_key}"}
            return Target(GATEWAY, f"{self.gateway.url}/v1/chat/completions", headers)
        return Target(DIRECT, f"{self.fake.url}/v1/chat/completions", {})


@dataclass(slots=True)
class Run:
    """One run of one scenario against one target: outcomes and resource readings."""

    scenario: str
    target: str
    round: int
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    chunks: int = 0
    reads: int = 0
    signed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    gateway_cpu_s: float = 0.0
    upstream_cpu_s: float = 0.0
    loader_cpu_s: float = 0.0
    rss_before_kb: int = 0
    rss_peak_kb: int = 0
    peak_streams: int = 0
    cpu_by_process_s: list[float] = field(default_factory=list)
    """The gateway's CPU in the run per process of its tree, most first (workers' balance)."""

    @property
    def requests(self) -> int:
        """Requests that finished, failed ones included."""
        return len(self.latencies_s)

    def add(self, outcome: Outcome) -> None:
        """Record one request's outcome."""
        self.latencies_s.append(outcome.latency_s)
        if outcome.ttft_s is not None:
            self.ttfts_s.append(outcome.ttft_s)
        self.chunks += outcome.chunks
        self.reads += outcome.reads
        self.signed += outcome.signed
        if outcome.error:
            self.errors[outcome.error] += 1


async def measure_idle(pairs: list[Pair]) -> None:
    """Each gateway's CPU use while idle (discovery refresh), subtracted from every run."""
    trees = [procs.descendants(pair.gateway.pid) for pair in pairs]
    before = [procs.cpu_seconds(tree) for tree in trees]
    await asyncio.sleep(IDLE_PROBE_S)
    for pair, tree, start in zip(pairs, trees, before, strict=True):
        pair.idle_cpu_per_s = (procs.cpu_seconds(tree) - start) / IDLE_PROBE_S


async def _sample_rss(tree: list[int], run: Run) -> None:
    """Keep ``run.rss_peak_kb`` at the highest RSS seen (backs up ``VmHWM``)."""
    while True:
        run.rss_peak_kb = max(run.rss_peak_kb, procs.memory_kb(tree)["VmRSS"])
        await asyncio.sleep(SAMPLE_S)


async def _metrics_text(http: aiohttp.ClientSession, url: str) -> str:
    try:
        async with http.get(url) as response:
            return await response.text()
    except client.TRANSPORT_ERRORS:
        return ""


async def _sample_streams(http: aiohttp.ClientSession, metrics_url: str, run: Run) -> None:
    """Keep ``run.peak_streams`` at the most streams the gateway reported open at once."""
    while True:
        for line in (await _metrics_text(http, metrics_url)).splitlines():
            if line.startswith(STREAMS_GAUGE):
                run.peak_streams = max(run.peak_streams, int(float(line.split()[1])))
        await asyncio.sleep(STREAMS_SAMPLE_S)


async def _show_progress(bar: tqdm, run: Run) -> None:
    """Show the finished-request count of the run in progress."""
    while True:
        bar.set_postfix_str(f"{run.scenario} {run.target} r{run.round}: {run.requests} done")
        await asyncio.sleep(0.5)


async def warm_up(http: aiohttp.ClientSession, target: Target, scenario: Scenario) -> int:
    """Open connections and warm caches with one small burst (not measured); returns its size.

    It runs before the scenario's fake settings apply: short streams without token delays.
    """
    count = min(scenario.concurrency, WARM_UP_MAX)
    await client.burst(
        http, target, stream=scenario.stream, count=count, done=lambda _outcome: None
    )
    return count


def _watchers(
    http: aiohttp.ClientSession, pair: Pair, scenario: Scenario, run: Run, bar: tqdm
) -> list[asyncio.Task[None]]:
    """Background samplers for one run: RSS, progress, and open streams during the burst."""
    tasks = [
        asyncio.create_task(_sample_rss(procs.descendants(pair.gateway.pid), run)),
        asyncio.create_task(_show_progress(bar, run)),
    ]
    if scenario.burst and run.target == GATEWAY:
        metrics_url = f"{pair.gateway.url}/metrics"
        tasks.append(asyncio.create_task(_sample_streams(http, metrics_url, run)))
    return tasks


async def set_fake(pair: Pair, settings: dict[str, Any]) -> None:
    """Change how the fake server answers (its ``POST /_control``).

    A fresh connection each time: a pooled one may have idled past the server's keep-alive.
    """
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{pair.fake.url}/_control", json=settings)
        response.raise_for_status()


async def _load(
    http: aiohttp.ClientSession, target: Target, scenario: Scenario, run: Run, duration_s: float
) -> float:
    """The measured load: the burst, or ``duration_s`` of closed-loop workers."""
    if scenario.burst:
        return await client.burst(
            http,
            target,
            stream=True,
            count=scenario.concurrency,
            done=run.add,
            spread_s=scenario.spread_s,
        )
    return await client.closed_loop(
        http,
        target,
        stream=scenario.stream,
        concurrency=scenario.concurrency,
        duration_s=duration_s,
        done=run.add,
    )


async def timed_run(
    http: aiohttp.ClientSession,
    pair: Pair,
    scenario: Scenario,
    run: Run,
    *,
    duration_s: float,
    bar: tqdm,
) -> Run:
    """Warm up, then load ``run.target`` and read CPU and memory around the load."""
    target = pair.target(run.target)
    warm_ups = await warm_up(http, target, scenario)
    gateway, fake = procs.descendants(pair.gateway.pid), procs.descendants(pair.fake.pid)
    await set_fake(pair, scenario.fake_settings())
    try:
        procs.reset_peak_rss(gateway)
        run.rss_before_kb = procs.memory_kb(gateway)["VmRSS"]
        started = time.perf_counter()
        by_process = procs.cpu_by_process(gateway)
        cpu = (sum(by_process.values()), procs.cpu_seconds(fake), time.process_time())
        watchers = _watchers(http, pair, scenario, run, bar)
        try:
            run.wall_s = await _load(http, target, scenario, run, duration_s)
            run.loader_cpu_s = time.process_time() - cpu[2]
            if run.target == GATEWAY:
                await asyncio.sleep(SETTLE_S)
        finally:
            for watcher in watchers:
                watcher.cancel()
        idle = pair.idle_cpu_per_s * (time.perf_counter() - started)
        after = procs.cpu_by_process(gateway)
        run.gateway_cpu_s = max(0.0, sum(after.values()) - cpu[0] - idle)
        spent = [after[pid] - by_process.get(pid, 0.0) for pid in after]
        run.cpu_by_process_s = sorted(spent, reverse=True)
        run.upstream_cpu_s = procs.cpu_seconds(fake) - cpu[1]
        run.rss_peak_kb = max(run.rss_peak_kb, procs.memory_kb(gateway)["VmHWM"])
    finally:
        await set_fake(pair, FAKE_DEFAULTS)
    if run.target == GATEWAY:
        pair.chat_requests += warm_ups + run.requests
    return run


async def run_scenario(
    pair: Pair, scenario: Scenario, rounds: int, duration_s: float, bar: tqdm
) -> list[Run]:
    """Alternate gateway and direct runs, ``rounds`` times each."""
    runs: list[Run] = []
    async with client.new_client() as to_gateway, client.new_client() as to_direct:
        for number in range(1, rounds + 1):
            for name, http in ((GATEWAY, to_gateway), (DIRECT, to_direct)):
                run = Run(scenario.key, name, number)
                bar.set_description(f"{scenario.title} → {name}")
                runs.append(
                    await timed_run(http, pair, scenario, run, duration_s=duration_s, bar=bar)
                )
                bar.update()
    return runs
