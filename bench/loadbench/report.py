"""Summaries of the runs, the verdict on each target, and the markdown and JSON reports."""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadbench.runner import DIRECT, GATEWAY, SHORT_TOKENS, Run, Scenario

MS = 1000.0
KB_PER_MB = 1024.0
# Goals from issue 16 (and, marked "earlier goal", from the issue before it).
BURST_GOAL = 5000
PLAIN_CPU_MS = 1.0
PLAIN_RPS = 800
STREAM_CPU_MS = 2.5
TOKEN_CPU_US = 30.0
THROUGHPUT_RATIO = 0.97
ADDED_TTFT_MS = 3.0
BURST_RSS_MB = 400
WORKER_SCALING = 1.8
C1_ADDED_MS = 1.5
MIN_SHARE = 0.01  # processes of a multi-worker gateway below this share of its CPU go unlisted


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
    reads_per_request: float | None
    errors: dict[str, int]
    signed: int
    gateway_cpu_ms: float | None
    upstream_cpu_ms: float | None
    loader_cpu_ms: float | None
    rss_before_mb: float | None
    rss_peak_mb: float | None
    stream: bool = False
    concurrency: int = 0
    tokens: int = SHORT_TOKENS
    token_delay_ms: float = 0.0
    burst: bool = False
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
    stream = scenario.stream
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
        chunks_per_s=sum(run.chunks for run in mine) / wall if stream and wall else None,
        reads_per_request=sum(run.reads for run in mine) / requests
        if stream and requests
        else None,
        errors=dict(errors),
        signed=sum(run.signed for run in mine),
        gateway_cpu_ms=_per_request_ms(sum(r.gateway_cpu_s for r in mine), requests)
        if gateway
        else None,
        upstream_cpu_ms=_per_request_ms(sum(r.upstream_cpu_s for r in mine), requests),
        loader_cpu_ms=_per_request_ms(sum(r.loader_cpu_s for r in mine), requests),
        rss_before_mb=min(r.rss_before_kb for r in mine) / KB_PER_MB if gateway else None,
        rss_peak_mb=max(r.rss_peak_kb for r in mine) / KB_PER_MB if gateway else None,
        stream=stream,
        concurrency=scenario.concurrency,
        tokens=scenario.tokens,
        token_delay_ms=scenario.token_delay_s * MS,
        burst=scenario.burst,
        extra=_extra(scenario, gateway, mine),
    )


def _extra(scenario: Scenario, gateway: bool, mine: list[Run]) -> dict[str, Any]:
    """Open streams at the burst's peak; how a multi-process gateway's CPU was shared."""
    extra: dict[str, Any] = {}
    if scenario.burst:
        extra["peak_open_streams"] = max(run.peak_streams for run in mine)
    if gateway and scenario.workers > 1:
        width = max(len(run.cpu_by_process_s) for run in mine)
        totals = [
            sum(run.cpu_by_process_s[i] for run in mine if i < len(run.cpu_by_process_s))
            for i in range(width)
        ]
        spent = sum(totals)
        extra["cpu_share_by_process"] = (
            [round(total / spent, 3) for total in totals] if spent else []
        )
    return extra


def compare(gateway: Summary, direct: Summary) -> None:
    """Fill in the gateway's added latency and throughput ratio next to the direct run.

    The ratio is of tokens (chunks) per second for streams, of requests per second otherwise.
    """
    if gateway.p50_ms is not None and direct.p50_ms is not None:
        gateway.added_p50_ms = gateway.p50_ms - direct.p50_ms
    if gateway.ttft_p50_ms is not None and direct.ttft_p50_ms is not None:
        gateway.added_ttft_p50_ms = gateway.ttft_p50_ms - direct.ttft_p50_ms
    if gateway.chunks_per_s is not None and direct.chunks_per_s:
        gateway.extra["throughput_ratio"] = gateway.chunks_per_s / direct.chunks_per_s
    elif direct.rps:
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


# the cost per relayed token


@dataclass(slots=True)
class TokenCost:
    """Gateway CPU per stream at two stream lengths, same pace and concurrency: the slope."""

    token_delay_ms: float
    concurrency: int
    short: str
    long: str
    short_tokens: int
    long_tokens: int
    short_cpu_ms: float
    long_cpu_ms: float

    @property
    def per_token_us(self) -> float:
        """Gateway CPU per additional relayed token, in µs."""
        spread = self.long_tokens - self.short_tokens
        return (self.long_cpu_ms - self.short_cpu_ms) * MS / spread

    @property
    def fixed_ms(self) -> float:
        """What a stream costs besides its tokens (the slope's intercept), in ms."""
        return self.short_cpu_ms - self.short_tokens * self.per_token_us / MS


def token_costs(table: dict[str, dict[str, Summary]]) -> list[TokenCost]:
    """One slope per (token pace, concurrency) measured at two stream lengths."""
    groups: dict[tuple[float, int], list[Summary]] = {}
    for pair in table.values():
        summary = pair[GATEWAY]
        if summary.stream and not summary.burst and summary.token_delay_ms > 0:
            groups.setdefault((summary.token_delay_ms, summary.concurrency), []).append(summary)
    costs: list[TokenCost] = []
    for (delay, concurrency), members in sorted(groups.items(), reverse=True):
        short = min(members, key=lambda summary: summary.tokens)
        long = max(members, key=lambda summary: summary.tokens)
        if long.tokens <= short.tokens or short.gateway_cpu_ms is None:
            continue
        if long.gateway_cpu_ms is None:
            continue
        costs.append(
            TokenCost(
                delay,
                concurrency,
                short.scenario,
                long.scenario,
                short.tokens,
                long.tokens,
                short.gateway_cpu_ms,
                long.gateway_cpu_ms,
            )
        )
    return costs


def token_cost_lines(costs: list[TokenCost]) -> list[str]:
    """The per-token cost, one line per token pace, for the report."""
    return [
        f"**{cost.per_token_us:,.1f} µs of gateway CPU per relayed token** at "
        f"{cost.token_delay_ms:g} ms/token ({cost.concurrency} streams): "
        f"{cost.short_cpu_ms:.2f} ms per {cost.short_tokens}-token stream (`{cost.short}`), "
        f"{cost.long_cpu_ms:.2f} ms per {cost.long_tokens}-token stream (`{cost.long}`); "
        f"fixed cost per stream (intercept) ≈ {cost.fixed_ms:.2f} ms"
        for cost in costs
    ]


# targets


@dataclass(slots=True)
class Verdict:
    """One target from the issue, next to what was measured and the direct baseline."""

    target: str
    goal: str
    measured: str
    met: bool | None
    direct: str = ""


def _fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _check(value: float | None, ok: bool) -> bool | None:
    return None if value is None else ok


def _at_most(value: float | None, limit: float) -> bool | None:
    return _check(value, value is not None and value <= limit)


def _at_least(value: float | None, floor: float) -> bool | None:
    return _check(value, value is not None and value >= floor)


def _fake_cpu(direct: Summary) -> str:
    return f"no gateway (fake server: {_fmt(direct.upstream_cpu_ms, ' ms')})"


def _plain_verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    verdicts: list[Verdict] = []
    if c32 := table.get("plain-c32"):
        gateway, direct = c32[GATEWAY], c32[DIRECT]
        cpu = gateway.gateway_cpu_ms
        verdicts += [
            Verdict(
                "non-streaming: gateway CPU per request (c=32)",
                f"≤ {PLAIN_CPU_MS:g} ms",
                _fmt(cpu, " ms", 3),
                _at_most(cpu, PLAIN_CPU_MS),
                _fake_cpu(direct),
            ),
            Verdict(
                "non-streaming: throughput on one core (c=32)",
                f"≥ {PLAIN_RPS} req/s",
                f"{gateway.rps:,.0f} req/s (1 core ÷ CPU per request ≈ "
                f"{_fmt(MS / cpu if cpu else None, ' req/s', 0)})",
                _at_least(gateway.rps, PLAIN_RPS),
                f"{direct.rps:,.0f} req/s",
            ),
        ]
    if c1 := table.get("plain-c1"):
        added = c1[GATEWAY].added_p50_ms
        verdicts.append(
            Verdict(
                "non-streaming: added p50 (c=1; earlier goal)",
                f"≤ {C1_ADDED_MS:g} ms",
                _fmt(added, " ms"),
                _at_most(added, C1_ADDED_MS),
                f"p50 {_fmt(c1[DIRECT].p50_ms, ' ms')}",
            )
        )
    return verdicts


def _cpu_per_stream(summary: Summary, direct: Summary, label: str) -> Verdict:
    cpu = summary.gateway_cpu_ms
    return Verdict(
        f"{label}: gateway CPU per {summary.tokens}-token stream",
        f"≤ {STREAM_CPU_MS:g} ms",
        f"{_fmt(cpu, ' ms', 3)} ({_fmt(summary.reads_per_request, '', 1)} reads per stream)",
        _at_most(cpu, STREAM_CPU_MS),
        f"{_fake_cpu(direct)}; {_fmt(direct.reads_per_request, '', 1)} reads per stream",
    )


def _per_token_verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for cost in token_costs(table):
        label = f"{cost.token_delay_ms:g} ms/token, one token per read"
        short, direct = table[cost.short][GATEWAY], table[cost.short][DIRECT]
        verdicts.append(_cpu_per_stream(short, direct, label))
        verdicts.append(
            Verdict(
                f"{label}: gateway CPU per additional relayed token "
                f"(slope {cost.short_tokens} → {cost.long_tokens} tokens)",
                f"≤ {TOKEN_CPU_US:g} µs",
                f"{cost.per_token_us:,.1f} µs",
                _at_most(cost.per_token_us, TOKEN_CPU_US),
                "no gateway",
            )
        )
    return verdicts


def _real_verdicts(pair: dict[str, Summary]) -> list[Verdict]:
    gateway, direct = pair[GATEWAY], pair[DIRECT]
    ratio = gateway.extra.get("throughput_ratio")
    added = gateway.added_ttft_p50_ms
    name = gateway.title
    return [
        Verdict(
            f"{name}: throughput (tokens/s)",
            f"≥ {THROUGHPUT_RATIO:g}x direct",
            f"{_fmt(ratio, 'x', 3)} ({_fmt(gateway.chunks_per_s, ' tokens/s', 0)})",
            _at_least(ratio, THROUGHPUT_RATIO),
            _fmt(direct.chunks_per_s, " tokens/s", 0),
        ),
        Verdict(
            f"{name}: added TTFT p50",
            f"≤ {ADDED_TTFT_MS:g} ms",
            _fmt(added, " ms"),
            _at_most(added, ADDED_TTFT_MS),
            f"TTFT p50 {_fmt(direct.ttft_p50_ms, ' ms')}",
        ),
        Verdict(
            f"{name}: errors",
            "0",
            f"{gateway.error_count:,} of {gateway.requests:,}",
            gateway.error_count == 0 if gateway.requests else None,
            f"{direct.error_count:,} of {direct.requests:,}",
        ),
    ]


def _stream_verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    verdicts: list[Verdict] = []
    if c32 := table.get("stream-c32"):
        verdicts.append(_cpu_per_stream(c32[GATEWAY], c32[DIRECT], "no token delay (coalesced)"))
    if c1 := table.get("stream-c1"):
        added = c1[GATEWAY].added_ttft_p50_ms
        verdicts.append(
            Verdict(
                "streaming: added TTFT p50 (c=1; earlier goal)",
                f"≤ {C1_ADDED_MS:g} ms",
                _fmt(added, " ms"),
                _at_most(added, C1_ADDED_MS),
                f"TTFT p50 {_fmt(c1[DIRECT].ttft_p50_ms, ' ms')}",
            )
        )
    verdicts += _per_token_verdicts(table)
    for key in ("real-c32", "real-c256"):
        if pair := table.get(key):
            verdicts += _real_verdicts(pair)
    return verdicts


def _burst_verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    burst = table.get("slow-burst")
    if not burst:
        return []
    gateway, direct = burst[GATEWAY], burst[DIRECT]
    growth = gateway.rss_growth_mb
    peak = gateway.extra.get("peak_open_streams", 0)
    name = f"{gateway.requests:,} slow streams open together"
    if gateway.requests < BURST_GOAL:
        name += f" (the goal is for {BURST_GOAL:,})"
    return [
        Verdict(
            f"{name}: errors",
            "0",
            str(gateway.error_count),
            gateway.error_count == 0,
            str(direct.error_count),
        ),
        Verdict(
            f"{name}: signed",
            "all",
            f"{gateway.signed:,} / {gateway.requests:,} (up to {peak:,} open at once)",
            gateway.requests > 0 and gateway.signed == gateway.requests,
            "unsigned (no gateway)",
        ),
        Verdict(
            f"{name}: gateway RSS growth",
            f"≤ {BURST_RSS_MB} MB",
            f"{_fmt(growth, ' MB', 1)} (peak {_fmt(gateway.rss_peak_mb, ' MB', 1)})",
            _at_most(growth, BURST_RSS_MB),
            "",
        ),
    ]


def _multicore_verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    multi, single = table.get("multicore"), table.get("plain-c32")
    if not multi or not single:
        return []
    two, one = multi[GATEWAY], single[GATEWAY]
    scaling = two.rps / one.rps if one.rps else None
    cpu_two, cpu_one = two.gateway_cpu_ms, one.gateway_cpu_ms
    by_cpu = 2 * cpu_one / cpu_two if cpu_one and cpu_two else None
    shares = " / ".join(
        f"{share:.0%}" for share in two.extra.get("cpu_share_by_process", []) if share >= MIN_SHARE
    )
    return [
        Verdict(
            "2 workers on 2 cores vs 1 worker on 1 core: non-streaming req/s (c=32)",
            f"≥ {WORKER_SCALING:g}x",
            f"{_fmt(scaling, 'x')} ({two.rps:,.0f} vs {one.rps:,.0f} req/s; CPU per request "
            f"{_fmt(cpu_two, ' ms', 3)} vs {_fmt(cpu_one, ' ms', 3)}, so on dedicated cores "
            f"≈ {_fmt(by_cpu, 'x')}; CPU shares of its processes: {shares})",
            _at_least(scaling, WORKER_SCALING),
            f"{multi[DIRECT].rps:,.0f} req/s",
        )
    ]


def verdicts(table: dict[str, dict[str, Summary]]) -> list[Verdict]:
    """Every target from the issue whose scenario ran."""
    return [
        *_plain_verdicts(table),
        *_multicore_verdicts(table),
        *_stream_verdicts(table),
        *_burst_verdicts(table),
    ]


# rendering


def _mark(met: bool | None) -> str:
    return {True: "MET", False: "**MISSED**", None: "n/a"}[met]


def _opt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else _fmt(value, "", digits)


def _cells(summary: Summary) -> list[str]:
    errors = ", ".join(f"{count} {kind}" for kind, count in summary.errors.items()) or "0"
    gateway = summary.target == GATEWAY
    return [
        summary.title,
        summary.target,
        f"{summary.requests:,}",
        _fmt(summary.rps, "", 1),
        _fmt(summary.p50_ms),
        _fmt(summary.p99_ms),
        _opt(summary.added_p50_ms) if gateway else "",
        _opt(summary.ttft_p50_ms),
        _opt(summary.ttft_p99_ms),
        _opt(summary.added_ttft_p50_ms),
        _opt(summary.chunks_per_s, 0),
        _opt(summary.extra.get("throughput_ratio"), 3) if gateway else "",
        _opt(summary.reads_per_request, 1),
        errors,
        _opt(summary.gateway_cpu_ms, 3),
        _opt(summary.rss_peak_mb, 1),
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
    "tokens/s",
    "x direct",
    "reads/stream",
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
    """The report: machine and method, targets, the per-token cost, then every measurement."""
    lines = ["# nilai gateway load benchmark", "", *(f"- {line}" for line in meta["header"]), ""]
    lines += ["## Targets", ""]
    lines += _table(
        ["Target", "Goal", "Measured (gateway)", "Direct (no gateway)", "Verdict"],
        [[c.target, c.goal, c.measured, c.direct, _mark(c.met)] for c in checks],
    )
    met = sum(1 for check in checks if check.met)
    missed = sum(1 for check in checks if check.met is False)
    lines += ["", f"{met} met, {missed} missed, {len(checks) - met - missed} not measurable.", ""]
    costs = token_cost_lines(token_costs(table))
    lines += ["## Per-token cost", ""]
    lines += [f"- {line}" for line in costs] or ["- not measured (needs the `tok*` scenarios)"]
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
            "chunks": run.chunks,
            "reads": run.reads,
            "errors": dict(run.errors),
            "gateway_cpu_s": run.gateway_cpu_s,
            "upstream_cpu_s": run.upstream_cpu_s,
            "loader_cpu_s": run.loader_cpu_s,
            "rss_before_kb": run.rss_before_kb,
            "rss_peak_kb": run.rss_peak_kb,
        }
        for run in runs
    ]
    per_token = [
        {**asdict(cost), "per_token_us": cost.per_token_us, "fixed_ms": cost.fixed_ms}
        for cost in token_costs(table)
    ]
    return {
        "meta": meta,
        "targets": [asdict(check) for check in checks],
        "per_token": per_token,
        "results": results,
        "runs": per_run,
    }


def publish(report: str, out: Path) -> None:
    """Print a markdown report and write it to ``out``."""
    sys.stdout.write(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
