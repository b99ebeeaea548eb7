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

from dashboards import alert_rule_groups
from dashboards.__main__ import RULES_FILE, write
from dashboards.alerts import DEFAULT_JOB
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


def test_replicas_disagreeing_on_the_model_fire_only_when_it_lasts(tmp_path: Path) -> None:
    info = {"revision": "main", "dtype": "bfloat16", "device": "cpu"}
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    series(m.MODEL_INFO, "1x40", model_id="org/a", **info),
                    # A second replica serves model b from 5m on: a rollout that never converges.
                    series(m.MODEL_INFO, "_x4 1x36", model_id="org/b", **{**info, "pod": "model-server-1"}),
                ],
                "alert_rule_test": [
                    check("ModelServersDisagree", "10m"),
                    check(
                        "ModelServersDisagree",
                        "25m",
                        firing("ModelServersDisagree", "2", namespace="serving", job=DEFAULT_JOB),
                    ),
                ],
            }
        ],
    )


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
