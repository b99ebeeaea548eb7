"""The alert rules through promtool: they load (``check rules``) and fire and resolve on synthetic
series as intended (``test rules``). Series are written with the metric constants, never retyped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import alert_rule_groups, all_dashboards
from dashboards.__main__ import RULES_FILE, write
from dashboards.alerts import DEFAULT_JOB
from dashboards.catalog import panel_queries
from dashboards.promql import expand_variables
from service import metrics as m
from service.api import paths

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool missing: install the prometheus Debian package"
)

RULES = {rule["alert"]: rule for group in alert_rule_groups() for rule in group["rules"]}
TARGET = {"job": DEFAULT_JOB, "namespace": "serving", "pod": "model-server-0", "instance": "10.0.0.7:8000"}


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    """One input series of a scrape target ``TARGET`` (plus ``labels``) in promtool's notation."""
    all_labels = ", ".join(f'{k}="{v}"' for k, v in {**TARGET, **labels}.items())
    return {"series": f"{metric}{{{all_labels}}}", "values": values}


def firing(alert: str, value: str = "", **labels: str) -> dict[str, Any]:
    """The alert promtool must see firing with ``labels``; annotations rendered as Prometheus would."""
    rule = RULES[alert]

    def render(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda match: labels[match.group(1)], text)
        return re.sub(r"\{\{ \$value[^}]*\}\}", value, text)

    return {
        "exp_labels": {**labels, **rule["labels"]},
        "exp_annotations": {k: render(v) for k, v in rule["annotations"].items()},
    }


def check(alert: str, at: str, *expected: dict[str, Any]) -> dict[str, Any]:
    return {"alertname": alert, "eval_time": at, "exp_alerts": list(expected)}


def run_promtool(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    write(tmp_path)
    test_file = tmp_path / "rules.test.yaml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [RULES_FILE], "evaluation_interval": "1m", "tests": tests})
    )
    result = subprocess.run(
        ["promtool", "test", "rules", test_file.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules_accepts_the_rule_file(tmp_path: Path) -> None:
    write(tmp_path)
    result = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / RULES_FILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RULES)} rules found" in result.stdout


def test_server_down_fires_after_two_minutes_and_resolves_when_scraped_again(tmp_path: Path) -> None:
    pod = {k: TARGET[k] for k in ("job", "namespace", "pod", "instance")}
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                # up from 0m to 2m, down from 3m to 7m, up again from 8m.
                "input_series": [series("up", "1x2 0x4 1x5")],
                "alert_rule_test": [
                    check("ModelServerDown", "2m"),
                    check("ModelServerDown", "4m"),  # pending: down for 1m only
                    check("ModelServerDown", "6m", firing("ModelServerDown", **pod)),
                    check("ModelServerDown", "9m"),
                ],
            }
        ],
    )


def test_error_ratio_fires_on_ten_percent_5xx_and_resolves_when_errors_stop(tmp_path: Path) -> None:
    route = {"route": paths.COMPLETION, "method": "POST"}
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    # 0.9 requests/s succeed throughout.
                    series(m.HTTP_REQUESTS_TOTAL, "0+54x40", status="200", **route),
                    # 0.1 requests/s fail from 10m to 20m, then none.
                    series(m.HTTP_REQUESTS_TOTAL, "0x10 6+6x9 60x20", status="500", **route),
                ],
                "alert_rule_test": [
                    check("ModelServerHighErrorRatio", "10m"),
                    check(
                        "ModelServerHighErrorRatio",
                        "20m",
                        firing("ModelServerHighErrorRatio", "10%", namespace="serving", job=DEFAULT_JOB),
                    ),
                    check("ModelServerHighErrorRatio", "30m"),
                ],
            }
        ],
    )


@pytest.mark.parametrize("failed_before", ["0", "_"], ids=["counter-initialised", "counter-series-new"])
def test_deployment_failed_fires_at_once_and_resolves_after_its_window(
    tmp_path: Path, failed_before: str
) -> None:
    target = {"namespace": TARGET["namespace"], "pod": TARGET["pod"]}
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    series(m.DEPLOYMENTS_TOTAL, "1x40", result="succeeded"),
                    # One deployment fails at 6m; "_" is a counter whose failed series appears only then.
                    series(m.DEPLOYMENTS_TOTAL, f"{failed_before}x5 1x35", result="failed"),
                    # Its phase shows "failed" until the next deployment starts at 10m.
                    series(m.DEPLOYMENT_PHASE, "0x5 1x4 0x30", phase="failed"),
                ],
                "alert_rule_test": [
                    check("ModelDeploymentFailed", "5m"),
                    check("ModelDeploymentFailed", "7m", firing("ModelDeploymentFailed", **target)),
                    check("ModelDeploymentFailed", "30m"),
                ],
            }
        ],
    )


def test_model_not_ready_fires_only_after_its_grace_period(tmp_path: Path) -> None:
    target = {"namespace": TARGET["namespace"], "pod": TARGET["pod"]}
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                # Loading for 3m (a normal start), ready, then without a model from 10m on.
                "input_series": [series(m.MODEL_READY, "0x2 1x7 0x20")],
                "alert_rule_test": [
                    check("ModelNotReady", "3m"),
                    check("ModelNotReady", "15m"),
                    check("ModelNotReady", "25m", firing("ModelNotReady", **target)),
                ],
            }
        ],
    )


#: One replica in cluster mode reads this desired model; the fleet rules and panels key on its presence.
DESIRED = {"model_id": "org/b", "revision": "main", "rollout_id": "r-2"}
#: A replica of the same job without cluster mode: its fleet gauges are exported at 0 and must never count.
INDEPENDENT = {"pod": "model-server-9"}


def minute_group(input_series: list[dict[str, str]], **tests: list[dict[str, Any]]) -> dict[str, Any]:
    """A promtool test group sampled every minute, with ``alert_rule_test`` and/or ``promql_expr_test``."""
    return {"interval": "1m", "input_series": input_series, **tests}


def test_replica_not_converged_fires_when_a_rollout_is_stuck_and_resolves_on_convergence(
    tmp_path: Path,
) -> None:
    stuck = {"namespace": TARGET["namespace"], "pod": "model-server-1"}
    series_ = [
        series(m.FLEET_DESIRED_MODEL_INFO, "1x40", **DESIRED),
        series(m.FLEET_REPLICA_CONVERGED, "1x40"),
        series(m.FLEET_DESIRED_MODEL_INFO, "1x40", **DESIRED, pod=stuck["pod"]),
        # A rollout starts at 5m; this replica serves the new model only from 25m.
        series(m.FLEET_REPLICA_CONVERGED, "1x4 0x20 1x15", pod=stuck["pod"]),
        series(m.FLEET_REPLICA_CONVERGED, "0x40", **INDEPENDENT),
    ]
    checks = [
        check("ModelServersDisagree", "4m"),
        check("ModelServersDisagree", "12m"),  # pending: a rollout may take a while
        check("ModelServersDisagree", "20m", firing("ModelServersDisagree", **stuck)),
        check("ModelServersDisagree", "30m"),
    ]
    run_promtool(tmp_path, [minute_group(series_, alert_rule_test=checks)])


def test_kube_api_disconnected_fires_after_its_grace_and_resolves_on_reconnect(tmp_path: Path) -> None:
    target = {"namespace": TARGET["namespace"], "pod": TARGET["pod"]}
    series_ = [
        series(m.FLEET_DESIRED_MODEL_INFO, "1x30", **DESIRED),
        # The watch is lost from 5m to 14m.
        series(m.KUBE_API_CONNECTED, "1x4 0x10 1x15"),
        series(m.KUBE_API_CONNECTED, "0x30", **INDEPENDENT),
    ]
    checks = [
        check("ModelServerKubeAPIDisconnected", "7m"),
        check("ModelServerKubeAPIDisconnected", "12m", firing("ModelServerKubeAPIDisconnected", **target)),
        check("ModelServerKubeAPIDisconnected", "20m"),
    ]
    run_promtool(tmp_path, [minute_group(series_, alert_rule_test=checks)])


def test_fleet_panels_show_cluster_mode_replicas_and_the_desired_model(tmp_path: Path) -> None:
    """The Fleet row's queries, expanded as Grafana would, on the same kind of series as the rules."""
    queries = {q.key: q.expr for q in panel_queries(all_dashboards())}
    variables = {"namespace": TARGET["namespace"], "pod": ".*", "__rate_interval": "5m"}

    def evaluated(key: str, at: str, *samples: tuple[dict[str, str], float]) -> dict[str, Any]:
        expected = [
            {"labels": "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "value": value}
            for labels, value in samples
        ]
        return {"expr": expand_variables(queries[key], variables), "eval_time": at, "exp_samples": expected}

    replica = {"namespace": TARGET["namespace"], "pod": TARGET["pod"]}
    series_ = [
        series(m.FLEET_DESIRED_MODEL_INFO, "1x10", **DESIRED),
        series(m.FLEET_REPLICA_CONVERGED, "0x4 1x5"),
        series(m.KUBE_API_CONNECTED, "1x2 0x2 1x5"),
        series(m.FLEET_REPLICA_CONVERGED, "0x10", **INDEPENDENT),
        series(m.KUBE_API_CONNECTED, "0x10", **INDEPENDENT),
    ]
    expressions = [
        evaluated("Desired model/A", "5m", ({"model_id": "org/b", "revision": "main"}, 1)),
        evaluated("Converged on the desired model/A", "2m", (replica, 0)),
        evaluated("Converged on the desired model/A", "6m", (replica, 1)),
        evaluated("Kubernetes API connection/A", "3m", (replica, 0)),
    ]
    run_promtool(tmp_path, [minute_group(series_, promql_expr_test=expressions)])


def test_queue_saturated_fires_on_queue_full_rejections(tmp_path: Path) -> None:
    target = {"namespace": TARGET["namespace"], "pod": TARGET["pod"]}
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    series(m.NUM_REQUESTS_WAITING, "0x40"),
                    # Rejections with 429 from 5m to 20m.
                    series(m.REQUESTS_REJECTED_TOTAL, "0x5 6+6x14 90x20", reason="queue_full"),
                ],
                "alert_rule_test": [
                    check("ModelServerQueueSaturated", "5m"),
                    check("ModelServerQueueSaturated", "15m", firing("ModelServerQueueSaturated", **target)),
                    check("ModelServerQueueSaturated", "35m"),
                ],
            }
        ],
    )


def test_queue_time_dominating_latency_fires_when_it_lasts_and_resolves(tmp_path: Path) -> None:
    target = {"namespace": TARGET["namespace"], "pod": TARGET["pod"]}
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    # Each minute 10 s of engine latency; queued: 1 s, then 8 s from 10m to 30m, then 1 s.
                    series(f"{m.E2E_REQUEST_LATENCY_SECONDS}_sum", "0+10x50", finish_reason="stop"),
                    series(f"{m.REQUEST_QUEUE_TIME_SECONDS}_sum", "0+1x9 10+8x19 170+1x20"),
                ],
                "alert_rule_test": [
                    check("ModelServerQueueTimeDominates", "9m"),
                    check("ModelServerQueueTimeDominates", "20m"),  # dominating, not yet for 10 minutes
                    check(
                        "ModelServerQueueTimeDominates",
                        "29m",
                        firing("ModelServerQueueTimeDominates", "80%", **target),
                    ),
                    check("ModelServerQueueTimeDominates", "45m"),
                ],
            }
        ],
    )
