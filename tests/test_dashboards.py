"""Structure of the generated dashboards and rules: what Grafana and Prometheus need before any query runs."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import alert_rule_groups, all_dashboards
from dashboards.__main__ import RULES_FILE, main
from dashboards.catalog import panel_queries, panels
from dashboards.panels import DATASOURCE
from dashboards.promql import DATASOURCE_VAR, expand_variables, grafana_rate_interval
from service import metrics

DASHBOARDS = all_dashboards()
GRID_WIDTH = 24

#: Names the server exports: the constants of service.metrics plus the series a histogram adds.
EXPORTED = {
    value + suffix
    for name, value in vars(metrics).items()
    if name.isupper() and isinstance(value, str)
    for suffix in ("", "_bucket", "_sum", "_count")
}
# Every query is scoped by labels, so each metric name in it is followed by a selector's "{".
_SELECTED_METRIC = re.compile(r"([a-zA-Z_:][\w:]*)\{")
#: Prometheus's own series, which the rules may use.
PROMETHEUS_SERIES = {"up"}


@pytest.fixture(params=sorted(DASHBOARDS))
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return DASHBOARDS[request.param]


def test_every_dashboard_has_a_unique_uid_and_title() -> None:
    assert len({d["uid"] for d in DASHBOARDS.values()}) == len(DASHBOARDS)
    assert all(d["title"] for d in DASHBOARDS.values())


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), ids
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_grid_positions_fit_the_grid_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0, panel["title"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= GRID_WIDTH, panel["title"]
        assert pos["y"] >= 0, panel["title"]
        for cell in itertools.product(
            range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        ):
            assert cell not in cells, f"{panel['title']!r} overlaps {cells[cell]!r} at {cell}"
            cells[cell] = panel["title"]


def test_datasource_is_a_prometheus_variable_and_every_panel_and_query_uses_it(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables[DATASOURCE_VAR]["type"] == "datasource"
    assert variables[DATASOURCE_VAR]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": f"${{{DATASOURCE_VAR}}}"}
    assert DATASOURCE.to_json() == ref
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ref, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == ref, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == ref, variable["name"]


def test_namespace_and_pod_variables_scope_every_query(dashboard: dict[str, Any]) -> None:
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == [DATASOURCE_VAR, "namespace", "pod"]
    for q in panel_queries({"d": dashboard}):
        assert 'namespace="$namespace"' in q.expr and 'pod=~"$pod"' in q.expr, q.key


def test_every_panel_has_a_unit_and_ref_ids_are_unique_per_panel(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        if panel["type"] in ("row", "state-timeline"):
            continue
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_queries_and_rules_only_name_metrics_the_server_exports() -> None:
    exprs = [q.expr for q in panel_queries(DASHBOARDS)]
    exprs += [rule["expr"] for group in alert_rule_groups() for rule in group["rules"]]
    named = set().union(*(_SELECTED_METRIC.findall(e) for e in exprs))
    assert len(named) > 10, named
    assert named <= EXPORTED | PROMETHEUS_SERIES, named - EXPORTED


def test_alert_rules_follow_the_contract() -> None:
    groups = alert_rule_groups(runbook_url="https://example.org/README.md")
    names = [rule["alert"] for group in groups for rule in group["rules"]]
    assert len(names) == len(set(names))
    for group in groups:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())
    assert all("runbook_url" not in r["annotations"] for g in alert_rule_groups() for r in g["rules"])


def test_cli_writes_the_dashboards_and_the_rules(tmp_path: Path) -> None:
    main(["--out", str(tmp_path)])
    for name, dashboard in DASHBOARDS.items():
        assert json.loads((tmp_path / name).read_text()) == dashboard
    assert yaml.safe_load((tmp_path / RULES_FILE).read_text()) == {"groups": alert_rule_groups()}


def test_variables_expand_like_grafana() -> None:
    values = {"namespace": "ns", "pod": "p-0", "__rate_interval": "4s"}
    assert expand_variables('x{namespace="$namespace", pod=~"${pod}"}[$__rate_interval]', values) == (
        'x{namespace="ns", pod=~"p-0"}[4s]'
    )
    with pytest.raises(KeyError):
        expand_variables("x[$__range]", values)
    # Grafana: max(step + scrape interval, 4 x scrape interval).
    assert grafana_rate_interval(step_s=1, scrape_interval_s=1) == "4000ms"
    assert grafana_rate_interval(step_s=60, scrape_interval_s=15) == "75000ms"
