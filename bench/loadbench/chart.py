"""The PNG: throughput gateway vs direct, and the gateway's CPU per request, per scenario."""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from loadbench.report import Summary
from loadbench.runner import DIRECT, GATEWAY

COLORS = {GATEWAY: "#3b6ea8", DIRECT: "#b0b0b0"}
# ms per request, from the issue (32-token streams)
CPU_GOALS = {
    "plain-c1": 1.0,
    "plain-c32": 1.0,
    "stream-c1": 2.5,
    "stream-c32": 2.5,
    "real-c32": 2.5,
    "real-c256": 2.5,
    "tok2-t32": 2.5,
}
WIDTH = 0.38


def _throughput(axes: Axes, table: dict[str, dict[str, Summary]]) -> None:
    """Grouped bars of req/s (log scale: the scenarios differ by orders of magnitude)."""
    labels = [pair[GATEWAY].title for pair in table.values()]
    for offset, name in ((-WIDTH / 2, GATEWAY), (WIDTH / 2, DIRECT)):
        values = [pair[name].rps for pair in table.values()]
        positions = [index + offset for index in range(len(values))]
        bars = axes.bar(positions, values, WIDTH, label=name, color=COLORS[name])
        axes.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    axes.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_ylabel("requests / s (log)")
    axes.set_title("Throughput: gateway vs direct to the fake model server")
    axes.legend()


def _cpu(axes: Axes, table: dict[str, dict[str, Summary]]) -> None:
    """Bars of the gateway's CPU ms per request, with the issue's goals as red ticks."""
    labels = [pair[GATEWAY].title for pair in table.values()]
    values = [pair[GATEWAY].gateway_cpu_ms or 0.0 for pair in table.values()]
    bars = axes.bar(range(len(values)), values, 0.6, color=COLORS[GATEWAY])
    axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    for index, key in enumerate(table):
        if key in CPU_GOALS:
            axes.hlines(CPU_GOALS[key], index - 0.35, index + 0.35, colors="red", linestyles="--")
    axes.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("gateway CPU ms / request (user+sys)")
    axes.set_title("Gateway CPU per request (red dashes: goal)")


def write_chart(path: Path, table: dict[str, dict[str, Summary]], subtitle: str) -> None:
    """Draw both panels side by side into ``path``."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    _throughput(left, table)
    _cpu(right, table)
    figure.suptitle(f"nilai gateway load benchmark: {subtitle}", fontsize=11)
    figure.savefig(path, dpi=120)
    plt.close(figure)
