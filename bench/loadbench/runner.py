"""Scenarios, and one timed run of a scenario against one target with its resource readings."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from loadbench import client, procs
from loadbench.client import Outcome, Target

GATEWAY, DIRECT = "gateway", "direct"
SETTLE_S = 1.3  # past the gateway's 1 s query-log flush, so the run's inserts are counted
SAMPLE_S = 0.25
WARM_UP_MAX = 64
IDLE_PROBE_S = 2.0
STREAMS_GAUGE = "nilai_chat_streams_in_flight "
STREAMS_SAMPLE_S = 1.0
# The burst's fake server holds each stream's first byte this long per stream in the burst, so
# that every request is in (the load generator needs ms per request) before tokens flow.
HOLD_PER_STREAM_S = 0.01
MIN_HOLD_S = 2.0


def burst_hold_s(scenario: Scenario) -> float:
    """How long the fake server holds the first byte of each burst stream."""
    return max(MIN_HOLD_S, scenario.concurrency * HOLD_PER_STREAM_S)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One load shape: request kind, concurrency, and which fake server answers."""

    key: str
    title: str
    stream: bool
    concurrency: int
    slow: bool = False
    burst: bool = False


def scenarios(slow_streams: int) -> list[Scenario]:
    """The scenarios in the order they run."""
    return [
        Scenario("plain-c1", "non-streaming, c=1", stream=False, concurrency=1),
        Scenario("plain-c32", "non-streaming, c=32", stream=False, concurrency=32),
        Scenario("stream-c1", "streaming, c=1", stream=True, concurrency=1),
        Scenario("stream-c32", "streaming, c=32", stream=True, concurrency=32),
        Scenario("real-c32", "20 ms/token, 32 streams", stream=True, concurrency=32, slow=True),
        Scenario(
            "slow-burst",
            f"20 ms/token, {slow_streams:,} streams at once",
            stream=True,
            concurrency=slow_streams,
            slow=True,
            burst=True,
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
    signed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    gateway_cpu_s: float = 0.0
    upstream_cpu_s: float = 0.0
    loader_cpu_s: float = 0.0
    rss_before_kb: int = 0
    rss_peak_kb: int = 0
    peak_streams: int = 0

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


async def _sample_streams(http: httpx.AsyncClient, metrics_url: str, run: Run) -> None:
    """Keep ``run.peak_streams`` at the most streams the gateway reported open at once."""
    while True:
        try:
            response = await http.get(metrics_url)
        except httpx.HTTPError:
            response = None
        for line in response.text.splitlines() if response else []:
            if line.startswith(STREAMS_GAUGE):
                run.peak_streams = max(run.peak_streams, int(float(line.split()[1])))
        await asyncio.sleep(STREAMS_SAMPLE_S)


async def _show_progress(bar: tqdm, run: Run) -> None:
    """Show the finished-request count of the run in progress."""
    while True:
        bar.set_postfix_str(f"{run.scenario} {run.target} r{run.round}: {run.requests} done")
        await asyncio.sleep(0.5)


async def warm_up(http: httpx.AsyncClient, target: Target, scenario: Scenario) -> int:
    """Open connections and warm caches with one small burst (not measured); returns its size."""
    count = min(scenario.concurrency, WARM_UP_MAX)
    await client.burst(
        http, target, stream=scenario.stream, count=count, done=lambda _outcome: None
    )
    return count


def _watchers(
    http: httpx.AsyncClient, pair: Pair, scenario: Scenario, run: Run, bar: tqdm
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


async def _hold_first_byte(pair: Pair, seconds: float) -> None:
    """Set the fake server's first-byte delay (its ``POST /_control``).

    A fresh connection each time: a pooled one may have idled past the server's keep-alive.
    """
    async with httpx.AsyncClient(timeout=30) as http:
        url = f"{pair.fake.url}/_control"
        response = await http.post(url, json={"first_byte_delay_s": seconds})
        response.raise_for_status()


async def held_burst(
    http: httpx.AsyncClient, pair: Pair, target: Target, scenario: Scenario, run: Run
) -> float:
    """The burst, with first bytes held so that all its streams are open at the same time."""
    await _hold_first_byte(pair, burst_hold_s(scenario))
    try:
        return await client.burst(
            http, target, stream=True, count=scenario.concurrency, done=run.add
        )
    finally:
        await _hold_first_byte(pair, 0.0)


async def timed_run(
    http: httpx.AsyncClient,
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
    procs.reset_peak_rss(gateway)
    run.rss_before_kb = procs.memory_kb(gateway)["VmRSS"]
    started = time.perf_counter()
    cpu = (procs.cpu_seconds(gateway), procs.cpu_seconds(fake), time.process_time())
    watchers = _watchers(http, pair, scenario, run, bar)
    try:
        if scenario.burst:
            run.wall_s = await held_burst(http, pair, target, scenario, run)
        else:
            run.wall_s = await client.closed_loop(
                http,
                target,
                stream=scenario.stream,
                concurrency=scenario.concurrency,
                duration_s=duration_s,
                done=run.add,
            )
        run.loader_cpu_s = time.process_time() - cpu[2]
        if run.target == GATEWAY:
            await asyncio.sleep(SETTLE_S)
    finally:
        for watcher in watchers:
            watcher.cancel()
    idle = pair.idle_cpu_per_s * (time.perf_counter() - started)
    run.gateway_cpu_s = max(0.0, procs.cpu_seconds(gateway) - cpu[0] - idle)
    run.upstream_cpu_s = procs.cpu_seconds(fake) - cpu[1]
    run.rss_peak_kb = max(run.rss_peak_kb, procs.memory_kb(gateway)["VmHWM"])
    if run.target == GATEWAY:
        pair.chat_requests += warm_ups + run.requests
    return run


async def run_scenario(
    pair: Pair, scenario: Scenario, rounds: int, duration_s: float, bar: tqdm
) -> list[Run]:
    """Alternate gateway and direct runs, ``rounds`` times each."""
    runs: list[Run] = []
    connections = max(scenario.concurrency, WARM_UP_MAX) + 8
    async with (
        client.new_client(connections) as to_gateway,
        client.new_client(connections) as to_direct,
    ):
        for number in range(1, rounds + 1):
            for name, http in ((GATEWAY, to_gateway), (DIRECT, to_direct)):
                run = Run(scenario.key, name, number)
                bar.set_description(f"{scenario.title} → {name}")
                runs.append(
                    await timed_run(http, pair, scenario, run, duration_s=duration_s, bar=bar)
                )
                bar.update()
    return runs
