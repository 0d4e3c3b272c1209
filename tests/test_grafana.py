"""The Grafana dashboard: every PromQL expression is valid (`promtool check rules`, each as a
recording rule once the dashboard's variables are substituted), every metric the README
lists is on some panel, every grouping label is one the metric has, and the dashboard is
shaped as Grafana 10 or newer imports it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML

from masqd.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "masqd.json"
# What the variables stand for when the expressions are checked: a plausible value of each.
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "6h",
    "job": "masqd",
    "node": ".*",
    "datasource": "prometheus",
}
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"{name} is not a variable the dashboard defines"
        return VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def readme_metrics() -> set[str]:
    text = (REPO / "README.md").read_text()
    return set(re.findall(r"`(masqd_[a-z0-9_]+)(?:\{[^}]*\})?`", text))


def test_the_dashboard_is_for_grafana_10_or_newer_with_templated_datasource_and_node() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["type"] == "query" and variables["node"]["multi"] is True
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$node"' in target["expr"], panel["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))


def test_no_two_panels_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels(dashboard()):
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_every_expression_passes_promtool_as_a_recording_rule(tmp_path: Path) -> None:
    found = expressions(dashboard())
    assert len(found) >= 15
    rules = [
        {"record": f"masqd_dashboard:query_{index}", "expr": substitute(expr)}
        for index, (_title, expr) in enumerate(found)
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_promtool_would_catch_a_broken_expression(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("needs promtool")
    path = tmp_path / "broken.yml"
    rule = {
        "record": "x:y",
        "expr": substitute(
            'sum by (route (rate(masqd_api_requests_total{job="$job"}[$__rate_interval]))'
        ),
    }
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [rule]}]}))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, check=False
    )
    assert proc.returncode != 0


def test_every_metric_the_readme_lists_is_on_some_panel() -> None:
    listed = readme_metrics()
    assert "masqd_config_reload_failures_total" in listed  # the README's list was found
    shown = " ".join(expr for _title, expr in expressions(dashboard()))
    missing = {
        name for name in listed if not re.search(rf"\b{name}(_bucket|_count|_sum)?\b", shown)
    }
    assert not missing, f"metrics the README lists but no panel shows: {sorted(missing)}"


def test_every_grouping_label_is_one_the_metric_has() -> None:
    """`sum by (route, code)` over a metric without `code` would show one series with an
    empty code: a panel that looks right and says nothing."""
    labels: dict[str, set[str]] = {}
    for family in Metrics().registry.collect():
        names = {label for sample in family.samples for label in sample.labels}
        for suffix in ("", "_total", "_bucket", "_count", "_sum"):
            labels[family.name + suffix] = names | {"le"} | {"instance", "job"}
    # Children created on first use (API routes) export no sample yet: add their label names.
    labels["masqd_api_requests_total"] |= {"route", "method", "code"}
    labels["masqd_api_request_duration_seconds_bucket"] |= {"route", "code"}
    for title, expr in expressions(dashboard()):
        metric = re.search(r"\b(masqd_[a-z0-9_]+)\{", expr)
        assert metric, title
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert label in labels[metric.group(1)], (
                    f"{title}: {metric.group(1)} has no {label}"
                )
