"""Summaries of the runs, the verdict on each target, and the markdown and JSON reports."""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadbench.runner import DIRECT, GATEWAY, Run, Scenario

MS = 1000.0
KB_PER_MB = 1024.0
BURST_GOAL = 1000


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (``share`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _ms(value: float | None) -> float | None:
    return None if value is None else value * MS


def _per_request_ms(seconds: float, requests: int) -> float | None:
    return seconds * MS / requests if requests else None


@dataclass(slots=True)
class Summary:
    """All runs of one scenario against one target, merged."""

    scenario: str
    title: str
    target: str
    requests: int
    wall_s: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    chunks_per_s: float | None
    errors: dict[str, int]
    signed: int
    gateway_cpu_ms: float | None
    upstream_cpu_ms: float | None
    loader_cpu_ms: float | None
    rss_before_mb: float | None
    rss_peak_mb: float | None
    added_p50_ms: float | None = None
    added_ttft_p50_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        """Failed requests."""
        return sum(self.errors.values())

    @property
    def rss_growth_mb(self) -> float | None:
        """Peak RSS minus RSS before the load."""
        if self.rss_peak_mb is None or self.rss_before_mb is None:
            return None
        return self.rss_peak_mb - self.rss_before_mb


def summarize(scenario: Scenario, target: str, runs: list[Run]) -> Summary:
    """Merge the runs of ``scenario`` against ``target``."""
    mine = [run for run in runs if run.scenario == scenario.key and run.target == target]
    latencies = [value for run in mine for value in run.latencies_s]
    ttfts = [value for run in mine for value in run.ttfts_s]
    requests, wall = len(latencies), sum(run.wall_s for run in mine)
    errors: Counter[str] = Counter()
    for run in mine:
        errors.update(run.errors)
    gateway = target == GATEWAY
    return Summary(
        scenario=scenario.key,
        title=scenario.title,
        target=target,
        requests=requests,
        wall_s=wall,
        rps=requests / wall if wall else 0.0,
        p50_ms=_ms(percentile(latencies, 0.50)),
        p99_ms=_ms(percentile(latencies, 0.99)),
        ttft_p50_ms=_ms(percentile(ttfts, 0.50)),
        ttft_p99_ms=_ms(percentile(ttfts, 0.99)),
        chunks_per_s=sum(run.chunks for run in mine) / wall if scenario.stream and wall else None,
        errors=dict(errors),
        signed=sum(run.signed for run in mine),
        gateway_cpu_ms=_per_request_ms(sum(r.gateway_cpu_s for r in mine), requests)
        if gateway
        else None,
        upstream_cpu_ms=_per_request_ms(sum(r.upstream_cpu_s for r in mine), requests),
        loader_cpu_ms=_per_request_ms(sum(r.loader_cpu_s for r in mine), requests),
        rss_before_mb=min(r.rss_before_kb for r in mine) / KB_PER_MB if gateway else None,
        rss_peak_mb=max(r.rss_peak_kb for r in mine) / KB_PER_MB if gateway else None,
        extra={"peak_open_streams": max(r.peak_streams for r in mine)} if scenario.burst else {},
    )


def compare(gateway: Summary, direct: Summary) -> None:
    """Fill in the gateway's added latency next to the direct run."""
    if gateway.p50_ms is not None and direct.p50_ms is not None:
        gateway.added_p50_ms = gateway.p50_ms - direct.p50_ms
    if gateway.ttft_p50_ms is not None and direct.ttft_p50_ms is not None:
        gateway.added_ttft_p50_ms = gateway.ttft_p50_ms - direct.ttft_p50_ms
    if direct.rps:
        gateway.extra["throughput_ratio"] = gateway.rps / direct.rps


def summarize_all(plan: list[Scenario], runs: list[Run]) -> dict[str, dict[str, Summary]]:
    """``{scenario key: {"gateway": ..., "direct": ...}}`` for every scenario that ran."""
    table: dict[str, dict[str, Summary]] = {}
    for scenario in plan:
        if not any(run.scenario == scenario.key for run in runs):
            continue
        pair = {name: summarize(scenario, name, runs) for name in (GATEWAY, DIRECT)}
        compare(pair[GATEWAY], pair[DIRECT])
        table[scenario.key] = pair
    return table


# targets


@dataclass(slots=True)
class Verdict:
    """One target from the issue, next to what was measured."""

    target: str
    goal: str
    measured: str
    met: bool | None


def _fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _check(value: float | None, ok: bool) -> bool | None:
    return None if value is None else ok


def _at_most(value: float | None, limit: float) -> bool | None:
    return _check(value, value is not None and value <= limit)


def _at_least(value: float | None, floor: float) -> bool | None:
    return _check(value, value is not None and value >= floor)


def _plain_verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    verdicts: list[Verdict] = []
    if c32 := table.get("plain-c32"):
        cpu = c32[GATEWAY].gateway_cpu_ms
        rps, ceiling = c32[GATEWAY].rps, c32[DIRECT].rps
        verdicts += [
            Verdict(
                "non-streaming CPU/request (c=32)", "≤ 1.0 ms", _fmt(cpu, " ms"), _at_most(cpu, 1.0)
            ),
            Verdict(
                "non-streaming throughput (c=32)",
                "≥ 800 req/s",
                f"{rps:,.0f} req/s (direct: {ceiling:,.0f}; 1 core ÷ CPU/request ≈ "
                f"{_fmt(MS / cpu if cpu else None, ' req/s', 0)})",
                _at_least(rps, 800),
            ),
        ]
    if c1 := table.get("plain-c1"):
        added = c1[GATEWAY].added_p50_ms
        verdicts.append(
            Verdict(
                "non-streaming added p50 (c=1)",
                "≤ 1.5 ms",
                _fmt(added, " ms"),
                _at_most(added, 1.5),
            )
        )
    return verdicts


def _stream_verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    verdicts: list[Verdict] = []
    if c32 := table.get("stream-c32"):
        cpu = c32[GATEWAY].gateway_cpu_ms
        verdicts.append(
            Verdict("streaming CPU/stream (c=32)", "≤ 2.5 ms", _fmt(cpu, " ms"), _at_most(cpu, 2.5))
        )
    if c1 := table.get("stream-c1"):
        added = c1[GATEWAY].added_ttft_p50_ms
        verdicts.append(
            Verdict(
                "streaming added TTFT p50 (c=1)",
                "≤ 1.5 ms",
                _fmt(added, " ms"),
                _at_most(added, 1.5),
            )
        )
    if real := table.get("real-c32"):
        ratio = real[GATEWAY].extra.get("throughput_ratio")
        added = real[GATEWAY].added_ttft_p50_ms
        verdicts += [
            Verdict(
                "20 ms/token, 32 streams: throughput",
                "≥ 0.95x direct",
                _fmt(ratio, "x", 3),
                _at_least(ratio, 0.95),
            ),
            Verdict(
                "20 ms/token, 32 streams: added TTFT p50",
                "≤ 5 ms",
                _fmt(added, " ms"),
                _at_most(added, 5.0),
            ),
        ]
    return verdicts


def _burst_verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    burst = table.get("slow-burst")
    if not burst:
        return []
    gateway = burst[GATEWAY]
    growth = gateway.rss_growth_mb
    peak = gateway.extra.get("peak_open_streams", 0)
    name = f"{gateway.requests:,} slow streams"
    if gateway.requests < BURST_GOAL:
        name += f" (goal is for {BURST_GOAL:,})"
    return [
        Verdict(
            f"{name}: errors",
            "0",
            str(gateway.error_count),
            gateway.error_count == 0,
        ),
        Verdict(
            f"{name}: signed",
            "all",
            f"{gateway.signed:,} / {gateway.requests:,} (up to {peak:,} open at once)",
            gateway.requests > 0 and gateway.signed == gateway.requests,
        ),
        Verdict(
            f"{name}: RSS growth",
            "≤ 200 MB",
            _fmt(growth, " MB", 1),
            _at_most(growth, 200),
        ),
    ]


def verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    """Every target from the issue whose scenario ran."""
    return [*_plain_verdicts(table), *_stream_verdicts(table), *_burst_verdicts(table)]


# rendering


def _mark(met: bool | None) -> str:
    return {True: "MET", False: "**MISSED**", None: "n/a"}[met]


def _cells(summary: Summary) -> list[str]:
    errors = ", ".join(f"{count} {kind}" for kind, count in summary.errors.items()) or "0"
    return [
        summary.title,
        summary.target,
        f"{summary.requests:,}",
        _fmt(summary.rps, "", 1),
        _fmt(summary.p50_ms),
        _fmt(summary.p99_ms),
        _fmt(summary.added_p50_ms) if summary.target == GATEWAY else "",
        _fmt(summary.ttft_p50_ms) if summary.ttft_p50_ms is not None else "",
        _fmt(summary.ttft_p99_ms) if summary.ttft_p99_ms is not None else "",
        _fmt(summary.added_ttft_p50_ms) if summary.added_ttft_p50_ms is not None else "",
        _fmt(summary.chunks_per_s, "", 0) if summary.chunks_per_s is not None else "",
        errors,
        _fmt(summary.gateway_cpu_ms, "", 3) if summary.gateway_cpu_ms is not None else "",
        _fmt(summary.rss_peak_mb, "", 1) if summary.rss_peak_mb is not None else "",
        _fmt(summary.upstream_cpu_ms, "", 3),
        _fmt(summary.loader_cpu_ms, "", 3),
    ]


MEASUREMENT_HEADER = [
    "Scenario",
    "Target",
    "Requests",
    "req/s",
    "p50 ms",
    "p99 ms",
    "+p50 ms",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "+TTFT p50 ms",
    "chunks/s",
    "Errors",
    "Gateway CPU ms/req",
    "Gateway peak RSS MB",
    "Fake server CPU ms/req",
    "Load generator CPU ms/req",
]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(
    meta: dict[str, Any], table: dict[str, dict[str, Summary]], checks: list[Verdict]
) -> str:
    """The report: header about the machine and method, targets, then every measurement."""
    lines = ["# nilai gateway load benchmark", "", *(f"- {line}" for line in meta["header"]), ""]
    lines += ["## Targets", ""]
    lines += _table(
        ["Target", "Goal", "Measured", "Verdict"],
        [[c.target, c.goal, c.measured, _mark(c.met)] for c in checks],
    )
    lines += ["", "## Measurements", ""]
    rows = [_cells(pair[name]) for pair in table.values() for name in (GATEWAY, DIRECT)]
    lines += _table(MEASUREMENT_HEADER, rows)
    lines += ["", "## Notes", "", *(f"- {note}" for note in meta["notes"]), ""]
    return "\n".join(lines)


def to_json(
    meta: dict[str, Any],
    table: dict[str, dict[str, Summary]],
    checks: list[Verdict],
    runs: list[Run],
) -> dict[str, Any]:
    """Everything, for tools: settings, merged results, verdicts and per-run figures."""
    results = {
        key: {
            name: {**asdict(summary), "rss_growth_mb": summary.rss_growth_mb}
            for name, summary in pair.items()
        }
        for key, pair in table.items()
    }
    per_run = [
        {
            "scenario": run.scenario,
            "target": run.target,
            "round": run.round,
            "requests": run.requests,
            "wall_s": run.wall_s,
            "rps": run.requests / run.wall_s if run.wall_s else 0.0,
            "p50_ms": _ms(percentile(run.latencies_s, 0.5)),
            "errors": dict(run.errors),
            "gateway_cpu_s": run.gateway_cpu_s,
            "upstream_cpu_s": run.upstream_cpu_s,
            "loader_cpu_s": run.loader_cpu_s,
            "rss_before_kb": run.rss_before_kb,
            "rss_peak_kb": run.rss_peak_kb,
        }
        for run in runs
    ]
    return {
        "meta": meta,
        "targets": [asdict(check) for check in checks],
        "results": results,
        "runs": per_run,
    }


def publish(report: str, out: Path) -> None:
    """Print a markdown report and write it to ``out``."""
    sys.stdout.write(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
