"""Grafana dashboards and Prometheus alert rules of the model server, as code.

The single place PromQL lives. ``all_dashboards()`` gives the dashboards (file name -> Grafana JSON)
that the constructs put in the Grafana sidecar's ConfigMap; ``alert_rule_groups()`` gives the rule
``groups`` that go into a PrometheusRule. ``python -m dashboards`` writes both to files.
"""

from __future__ import annotations

from typing import Any

from dashboards.alerts import alert_rule_groups
from dashboards.serving import FILE_NAME, serving_dashboard

__all__ = ["alert_rule_groups", "all_dashboards"]


def all_dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard, by the file name it is shipped under."""
    return {FILE_NAME: serving_dashboard()}
