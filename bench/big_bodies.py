"""Huge but valid chat bodies against a real gateway: how long does ``/healthz`` wait meanwhile?

Starts a fake model server and one ``nilai api`` (SQLite, in-memory limits and discovery; the
gateway pinned to core 0, this load generator and the fake on the other cores), then runs two
phases of ``--seconds`` each while a probe thread sends ``GET /healthz`` every 20 ms:

1. ``idle``: the probe alone;
2. ``big bodies``: ``--clients`` closed-loop clients each post, again and again, one body of
   about 10 MB in the chosen ``--shape``: ``messages`` (320,000 one-word messages, as in
   issue 13), or ``parts`` (one message of 600,000 content parts).

It reports the probe's p50, p99 and worst latency and the big bodies' answers, as a markdown
table printed and written to ``bench/results/big_bodies.md``. Stops what it started, also on
Ctrl-C.

Run: ``.venv/bin/python bench/big_bodies.py`` (``--shape parts``, ``--clients 4``,
``--seconds 5``). To measure another checkout's gateway, put its ``src`` first:
``PYTHONPATH=/path/to/old/src``. Not run in CI: the numbers depend on the machine and on what
else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from loadbench import procs
from loadbench.report import publish

import nilai

RESULTS = Path(__file__).with_name("results") / "big_bodies.md"
GATEWAY_CORE = "0"
API_KEY = "bench-big-bodies-key"
PROBE_EVERY_S = 0.02
MESSAGES = 320_000
PARTS = 600_000


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--shape", choices=("messages", "parts"), default="messages")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop big-body clients")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--model", default="fake-model", help="the model the bodies name")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def big_body(shape: str, model: str) -> bytes:
    """About 10 MB of valid JSON, within the default 10 MiB body limit."""
    if shape == "messages":
        messages = [{"role": "user", "content": "hi"}] * MESSAGES
    else:
        messages = [{"role": "user", "content": [{"type": "text"}] * PARTS}]
    return orjson.dumps({"model": model, "messages": messages})


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    probe_ms: list[float] = field(default_factory=list[float])
    probe_failures: int = 0
    big_status: Counter[int] = field(default_factory=Counter[int])
    big_ms: list[float] = field(default_factory=list[float])

    def row(self) -> str:
        """One markdown table row."""
        ms = sorted(self.probe_ms)
        p50 = statistics.median(ms) if ms else float("nan")
        p99 = ms[int(0.99 * (len(ms) - 1))] if ms else float("nan")
        worst = ms[-1] if ms else float("nan")
        answers = " ".join(f"{code} x{n}" for code, n in sorted(self.big_status.items())) or "-"
        big = f"{statistics.median(self.big_ms):.0f}" if self.big_ms else "-"
        return (
            f"| {self.name} | {len(ms)} | {self.probe_failures} | {p50:.1f} | {p99:.1f} | "
            f"{worst:.1f} | {answers} | {big} |"
        )


def probe(url: str, phase: Phase, stop: threading.Event) -> None:
    """``GET /healthz`` every ``PROBE_EVERY_S`` until ``stop``, recording each latency."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = client.get("/healthz")
                response.raise_for_status()
            except httpx.HTTPError:
                phase.probe_failures += 1
            else:
                phase.probe_ms.append((time.perf_counter() - started) * 1000)
            stop.wait(max(0.0, PROBE_EVERY_S - (time.perf_counter() - started)))


async def big_clients(url: str, body: bytes, clients: int, seconds: float, phase: Phase) -> None:
    """``clients`` closed loops posting ``body`` for ``seconds``."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    deadline = time.monotonic() + seconds

    async def loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", content=body, headers=headers)
            phase.big_status[response.status_code] += 1
            phase.big_ms.append((time.perf_counter() - started) * 1000)

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(loop(client) for _ in range(clients)))


def run_phase(name: str, url: str, args: argparse.Namespace, body: bytes | None) -> Phase:
    """One phase: the probe, with or without the big-body clients."""
    phase = Phase(name)
    stop = threading.Event()
    thread = threading.Thread(target=probe, args=(url, phase, stop), daemon=True)
    thread.start()
    try:
        if body is None:
            time.sleep(args.seconds)
        else:
            asyncio.run(big_clients(url, body, args.clients, args.seconds, phase))
    finally:
        stop.set()
        thread.join()
    return phase


def benchmark(args: argparse.Namespace) -> str:
    """Set up, run both phases, tear down; returns the markdown report."""
    others = {cpu for cpu in os.sched_getaffinity(0) if cpu != int(GATEWAY_CORE)}
    if others:
        os.sched_setaffinity(0, others)
    body = big_body(args.shape, args.model)
    fake = gateway = None
    try:
        with tempfile.TemporaryDirectory(prefix="nilai-big-bodies-") as tmp:
            logs = Path(tmp)
            spare = ",".join(str(cpu) for cpu in sorted(others)) or GATEWAY_CORE
            fake = procs.spawn_fake("fake", 0.0, spare, logs)
            procs.ready_fake(fake, tokens=8)
            env = {
                "NILAI_UPSTREAM_URLS": fake.url,
                "NILAI_DATA_DIR": str(logs / "data"),
                "NILAI_API_KEY": API_KEY,
                "NILAI_RATE_LIMIT_MINUTE": "0",
                "NILAI_RATE_LIMIT_HOUR": "0",
                "NILAI_RATE_LIMIT_DAY": "0",
                "NILAI_MODEL_CONCURRENCY": "1000",
                "NILAI_LOG_LEVEL": "error",
            }
            gateway = procs.spawn_gateway("gateway", env, GATEWAY_CORE, logs)
            procs.ready_gateway(gateway, API_KEY)
            phases = [
                run_phase("idle", gateway.url, args, None),
                run_phase("big bodies", gateway.url, args, body),
            ]
    finally:
        for service in (gateway, fake):
            if service is not None:
                procs.stop(service)
    lines = [
        f"# Huge valid bodies: nilai from {Path(nilai.__file__).parent}",
        "",
        f"{args.clients} closed-loop clients posting {len(body) / 1e6:.1f} MB bodies "
        f"(shape `{args.shape}`, model `{args.model}`) for {args.seconds:g} s; `/healthz` probed "
        f"every {PROBE_EVERY_S * 1000:.0f} ms; gateway pinned to core {GATEWAY_CORE}; Python "
        f"{sys.version.split()[0]}.",
        "",
        "| phase | probes | probe failures | healthz p50 ms | healthz p99 ms | healthz max ms "
        "| big-body answers | big-body p50 ms |",
        "|---|---|---|---|---|---|---|---|",
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
