"""The Grafana dashboard in deploy/grafana is valid and queries only metrics the gateway has."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nilai.gateway.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "nilai-dashboard.json"
METRIC_NAME = re.compile(r"\bnilai_[a-z0-9_]+\b")
GRID_COLUMNS = 24


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


@pytest.fixture(scope="module")
def sample_names() -> set[str]:
    """The names of every sample the gateway's registry exposes once each series has a value."""
    metrics = Metrics()
    for instrument in vars(metrics).values():
        if not isinstance(instrument, Counter | Gauge | Histogram):
            continue
        labelnames = instrument._labelnames
        child = instrument.labels(*["x"] * len(labelnames)) if labelnames else instrument
        if isinstance(child, Histogram):
            child.observe(0.1)
        elif isinstance(child, Counter):
            child.inc()
        else:
            child.set(1)
    text = generate_latest(metrics.registry).decode()
    names = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    assert names, "the registry exposed no samples"
    return names


def _exprs(dashboard: dict[str, Any], panels: list[dict[str, Any]]) -> list[str]:
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert "label_values(nilai_chat_duration_seconds_count, model)" in json.dumps(
        variables["model"]
    )


def test_panel_ids_are_unique(panels: list[dict[str, Any]]) -> None:
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids


def test_every_panel_has_targets_on_the_templated_datasource(
    panels: list[dict[str, Any]],
) -> None:
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_grid_positions_fit_and_do_not_overlap(panels: list[dict[str, Any]]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["w"] > 0
        assert pos["h"] > 0, panel["title"]
        assert pos["x"] >= 0
        assert pos["x"] + pos["w"] <= GRID_COLUMNS, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_metric_queried_exists_in_the_gateway_registry(
    dashboard: dict[str, Any], panels: list[dict[str, Any]], sample_names: set[str]
) -> None:
    for expr in _exprs(dashboard, panels):
        used = set(METRIC_NAME.findall(expr))
        assert used, f"no nilai metric in {expr!r}"
        unknown = used - sample_names
        assert not unknown, f"{expr!r} uses metrics the gateway does not expose: {unknown}"
