"""Slow and oversized clients against a real gateway: does ``/healthz`` stay fast, memory flat?

Starts one ``nilai api`` (SQLite, in-process limits; pinned to core 0, this load generator on
the other cores) with its default limits, then runs two phases while a probe opens a new
connection every 20 ms and asks ``GET /healthz`` (as a kubelet does):

1. ``idle``: the probe alone, ``--idle-seconds``;
2. ``attack``, ``--seconds``: ``--tricklers`` connections send a request a byte a second (half
   trickle their headers, half an authenticated chat body that declares 1,000 bytes); each
   reconnects when the gateway closes it, as an attacker would. Meanwhile ``--big-headers``
   clients each send a header of ``--header-mib`` MiB that never ends, again and again.

It reports the probe's p50, p99 and worst latency and failures, the gateway's RSS before and
after and its peak, how often the gateway closed a trickling connection and how many were still
open at the end, and how many oversized headers the gateway read to the end. Printed, and
written to ``bench/results/slow_clients.md``. Stops what it started, also on Ctrl-C.

The attack phase should outlast the body read timeout (30 s by default) to show it firing.

Run: ``.venv/bin/python bench/slow_clients.py`` (``--seconds 45``, ``--tricklers 200``,
``--big-headers 4``, ``--header-mib 64``). To measure another checkout's gateway, put its
``src`` first: ``PYTHONPATH=/path/to/old/src``. Not run in CI: the numbers depend on the machine
and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadbench import procs
from loadbench.report import publish

import nilai

RESULTS = Path(__file__).with_name("results") / "slow_clients.md"
GATEWAY_CORE = "0"
API_KEY = "bench-slow-clients-key"
PROBE_EVERY_S = 0.02
PROBE_TIMEOUT_S = 30.0
TRICKLE_EVERY_S = 1.0
CHUNK = 1024 * 1024


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=45.0, help="length of the attack")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="length of idle phase")
    parser.add_argument("--tricklers", type=int, default=200, help="trickling connections")
    parser.add_argument("--big-headers", type=int, default=4, help="oversized-header clients")
    parser.add_argument("--header-mib", type=int, default=64, help="size of each big header")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    probe_ms: list[float] = field(default_factory=list)
    probe_failures: int = 0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    peak_rss_mb: float = 0.0
    trickles_closed: int = 0
    trickles_open_at_end: int = 0
    big_headers_cut: int = 0
    big_headers_read: int = 0

    def row(self) -> str:
        """One markdown table row."""
        ms = sorted(self.probe_ms)
        p50 = statistics.median(ms) if ms else float("nan")
        p99 = ms[int(0.99 * (len(ms) - 1))] if ms else float("nan")
        worst = ms[-1] if ms else float("nan")
        return (
            f"| {self.name} | {len(ms)} | {self.probe_failures} | {p50:.1f} | {p99:.1f} | "
            f"{worst:.1f} | {self.rss_before_mb:.0f} → {self.rss_after_mb:.0f} "
            f"(peak {self.peak_rss_mb:.0f}) | {self.trickles_closed} | "
            f"{self.trickles_open_at_end} | {self.big_headers_cut} / {self.big_headers_read} |"
        )


def probe(port: int, phase: Phase, stop: threading.Event) -> None:
    """A new connection and ``GET /healthz`` every ``PROBE_EVERY_S`` until ``stop``."""
    while not stop.is_set():
        started = time.perf_counter()
        if healthz_answers(port):
            phase.probe_ms.append((time.perf_counter() - started) * 1000)
        else:
            phase.probe_failures += 1
        stop.wait(max(0.0, PROBE_EVERY_S - (time.perf_counter() - started)))


def healthz_answers(port: int) -> bool:
    """Whether ``GET /healthz`` on a new connection is answered 200."""
    request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S) as sock:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError:
        return False
    return answer.startswith(b"HTTP/1.1 200")


def trickled_request(index: int) -> tuple[bytes, bytes]:
    """What a trickler sends at once, and what it then sends a byte at a time."""
    if index % 2 == 0:
        return b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n", b"X-Slow: " + b"a" * 4096
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: Bearer {API_KEY}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    return head, b" " * 999


async def trickler(port: int, index: int, deadline: float, phase: Phase) -> None:
    """Trickle a request a byte a second; reconnect whenever the gateway closes."""
    head, rest = trickled_request(index)
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(TRICKLE_EVERY_S)
            continue
        closed = False
        try:
            writer.write(head)
            await writer.drain()
            for byte in rest:
                if time.monotonic() >= deadline:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TRICKLE_EVERY_S):
                        await reader.read(65536)  # returns only when the gateway answers or closes
                        closed = True
                        break
                writer.write(bytes([byte]))
                await writer.drain()
        except OSError:
            closed = True
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if closed:
            phase.trickles_closed += 1
        elif time.monotonic() >= deadline:
            phase.trickles_open_at_end += 1


async def big_header(port: int, mib: int, deadline: float, phase: Phase) -> None:
    """Send a header of ``mib`` MiB that never ends, again and again until ``deadline``."""
    chunk = b"a" * CHUNK
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Big: ")
            for _ in range(mib):
                writer.write(chunk)
                await writer.drain()
            phase.big_headers_read += 1
        except OSError:
            phase.big_headers_cut += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def attack(port: int, args: argparse.Namespace, phase: Phase) -> None:
    """Every trickler and big-header client, for ``args.seconds``."""
    deadline = time.monotonic() + args.seconds
    await asyncio.gather(
        *(trickler(port, index, deadline, phase) for index in range(args.tricklers)),
        *(big_header(port, args.header_mib, deadline, phase) for _ in range(args.big_headers)),
    )


def run_phase(
    name: str, gateway: procs.Service, port: int, args: argparse.Namespace, *, attacked: bool
) -> Phase:
    """One phase: the probe, with or without the attack."""
    phase = Phase(name)
    tree = procs.descendants(gateway.pid)
    phase.rss_before_mb = procs.memory_kb(tree)["VmRSS"] / 1024
    procs.reset_peak_rss(tree)
    stop = threading.Event()
    thread = threading.Thread(target=probe, args=(port, phase, stop), daemon=True)
    thread.start()
    try:
        if attacked:
            asyncio.run(attack(port, args, phase))
        else:
            time.sleep(args.idle_seconds)
    finally:
        stop.set()
        thread.join()
    memory = procs.memory_kb(tree)
    phase.rss_after_mb = memory["VmRSS"] / 1024
    phase.peak_rss_mb = memory["VmHWM"] / 1024
    return phase


def benchmark(args: argparse.Namespace) -> str:
    """Set up, run both phases, tear down; returns the markdown report."""
    others = {cpu for cpu in os.sched_getaffinity(0) if cpu != int(GATEWAY_CORE)}
    if others:
        os.sched_setaffinity(0, others)
    gateway = None
    try:
        with tempfile.TemporaryDirectory(prefix="nilai-slow-clients-") as tmp:
            logs = Path(tmp)
            env = {
                "NILAI_DATA_DIR": str(logs / "data"),
                "NILAI_API_KEY": API_KEY,
                "NILAI_RATE_LIMIT_MINUTE": "0",
                "NILAI_RATE_LIMIT_HOUR": "0",
                "NILAI_RATE_LIMIT_DAY": "0",
                "NILAI_LOG_LEVEL": "error",
            }
            gateway = procs.spawn_gateway("gateway", env, GATEWAY_CORE, logs)
            procs.wait_ready(gateway, f"{gateway.url}/healthz", {})
            port = int(gateway.url.rsplit(":", 1)[1])
            phases = [
                run_phase("idle", gateway, port, args, attacked=False),
                run_phase("attack", gateway, port, args, attacked=True),
            ]
    finally:
        if gateway is not None:
            procs.stop(gateway)
    lines = [
        f"# Slow and oversized clients: nilai from {Path(nilai.__file__).parent}",
        "",
        f"Attack for {args.seconds:g} s: {args.tricklers} connections trickling a request a "
        f"byte a second (half headers, half a chat body), reconnecting when closed, and "
        f"{args.big_headers} clients sending {args.header_mib} MiB headers in a loop. "
        f"`/healthz` probed on a new connection every {PROBE_EVERY_S * 1000:.0f} ms; gateway "
        f"pinned to core {GATEWAY_CORE}, default limits; Python {sys.version.split()[0]}.",
        "",
        "| phase | probes | probe failures | healthz p50 ms | healthz p99 ms | healthz max ms "
        "| gateway RSS MB | trickles closed by the gateway | trickles still open at the end "
        "| big headers cut / read to the end |",
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
