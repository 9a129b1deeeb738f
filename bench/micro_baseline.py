"""The micro benchmarks against the committed baseline: print the change, or refresh it.

``compare`` reads a pytest-benchmark JSON file (``bench/results/micro.json``) and prints, per
benchmark, the baseline's median, the new median and the change, as a markdown table (also
written to ``--out``). It never fails on a regression: the figures come from shared machines and
short rounds, so they inform, they do not gate. ``write`` stores the medians of a results file
as the new baseline (``make bench-baseline``), to be committed.

Run: ``.venv/bin/python bench/micro_baseline.py compare bench/results/micro.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).with_name("baseline") / "micro.json"
US = 1e6
NOTICEABLE = 0.10  # a change this large (either way) is marked; smaller ones are noise here
STATS = ("median", "mean", "min", "stddev", "iqr")


def load_results(path: Path) -> dict[str, Any]:
    """A pytest-benchmark JSON file (``--benchmark-json``)."""
    return json.loads(path.read_text())


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """What the baseline keeps: the machine, the commit, and each benchmark's timings in µs."""
    machine = results.get("machine_info") or {}
    cpu = machine.get("cpu") or {}
    commit = results.get("commit_info") or {}
    return {
        "about": "Baseline of `make bench-quick` (bench/test_micro.py); refresh with "
        "`make bench-baseline` and commit. Times in microseconds per call.",
        "date": results.get("datetime") or datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit.get("id"),
        "dirty": commit.get("dirty"),
        "machine": {
            "cpu": cpu.get("brand_raw"),
            "cores": cpu.get("count"),
            "python": machine.get("python_version"),
        },
        "benchmarks": {
            bench["name"]: {
                **{f"{stat}_us": round(bench["stats"][stat] * US, 4) for stat in STATS},
                "rounds": bench["stats"]["rounds"],
            }
            for bench in results.get("benchmarks", [])
        },
    }


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _change(old: float | None, new: float | None) -> str:
    if old is None or new is None or old <= 0:
        return "-"
    change = new / old - 1
    mark = ""
    if change >= NOTICEABLE:
        mark = " (slower)"
    elif change <= -NOTICEABLE:
        mark = " (faster)"
    return f"{change:+.1%}{mark}"


def comparison(baseline: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """The markdown table of baseline vs new medians, with notes on what may skew it."""
    lines = ["## Micro benchmarks against the committed baseline", ""]
    if baseline is None:
        lines += [
            f"No baseline at {BASELINE}: run `make bench-baseline` and commit it.",
            "",
        ]
    old = (baseline or {}).get("benchmarks", {})
    new = now["benchmarks"]
    lines += [
        "| Benchmark | Baseline median µs | Now median µs | Change | Now min µs |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in [*new, *(name for name in old if name not in new)]:
        before, after = old.get(name, {}), new.get(name, {})
        lines.append(
            f"| {name} | {_us(before.get('median_us'))} | {_us(after.get('median_us'))} | "
            f"{_change(before.get('median_us'), after.get('median_us'))} | "
            f"{_us(after.get('min_us'))} |"
        )
    if baseline is not None:
        lines += ["", f"Baseline: {_about(baseline)}.", f"Now: {_about(now)}."]
        if baseline["machine"].get("cpu") != now["machine"].get("cpu"):
            lines.append("The CPUs differ: compare with care.")
    lines += [
        "",
        f"Changes of {NOTICEABLE:.0%} or more are marked; there is no gate (short rounds on a "
        "shared machine vary by that much).",
        "",
    ]
    return "\n".join(lines)


def _about(summary: dict[str, Any]) -> str:
    commit = (summary.get("commit") or "?")[:12] + (" (dirty)" if summary.get("dirty") else "")
    machine = summary.get("machine") or {}
    return (
        f"{summary.get('date', '?')}, commit {commit}, {machine.get('cpu') or '?'}, "
        f"Python {machine.get('python') or '?'}"
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("action", choices=["compare", "write"])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--out", type=Path, help="also write the comparison (markdown) here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Compare with the baseline (always exit 0 once the results are read), or write it."""
    args = parse(argv)
    now = summarize(load_results(args.results))
    if args.action == "write":
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(json.dumps(now, indent=2) + "\n")
        sys.stdout.write(f"Baseline of {len(now['benchmarks'])} benchmarks: {args.baseline}\n")
        return 0
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else None
    text = comparison(baseline, now)
    sys.stdout.write(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
