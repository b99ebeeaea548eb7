"""Prometheus Operator objects of the model server: a ``ServiceMonitor`` and a ``PrometheusRule``.

Both are custom resources, so they are plain ``ApiObject``s (no generated types exist for CRDs here);
the tests hold their fields against the prometheus-operator models.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import cdk8s
from constructs import Construct

from infra_constructs.conventions import MONITORING_NAMESPACE, PART_OF_LABEL, PROMETHEUS_SELECTOR_LABELS
from infra_constructs.grafana import GrafanaDashboard
from infra_constructs.model_server import APP_NAME_LABEL, ModelServer
from service.api.paths import HTTP_PORT_NAME, METRICS

_API_VERSION = "monitoring.coreos.com/v1"


def _from_dashboards(hook: str, empty: Any) -> Any:
    """Call ``dashboards.<hook>()``; ``empty`` while that package does not provide it (yet)."""
    try:
        module = importlib.import_module("dashboards")
    except ModuleNotFoundError as error:
        if error.name != "dashboards":
            raise  # a dependency of dashboards/ is missing: that is a real error
        return empty
    function = getattr(module, hook, None)
    return function() if function else empty


def default_rule_groups() -> list[dict[str, Any]]:
    """The alert rule groups of ``dashboards.alert_rule_groups()``, or none when it does not exist."""
    return _from_dashboards("alert_rule_groups", [])


def default_dashboards() -> dict[str, dict[str, Any]]:
    """The dashboards of ``dashboards.all_dashboards()``, or none when it does not exist."""
    return _from_dashboards("all_dashboards", {})


class ServiceMonitor(cdk8s.ApiObject):
    """A ``ServiceMonitor`` scraping a ``ModelServer``'s Service on its ``http`` port at ``/metrics``.

    Args:
        scope, id: as for any construct.
        server: the server whose Service is scraped (same namespace).
        selector_labels: labels Prometheus selects ServiceMonitors by. Default:
            ``PROMETHEUS_SELECTOR_LABELS`` (kube-prometheus-stack's ``release`` label).
        interval: scrape interval. Default: ``"15s"``.
        scrape_timeout: Default: ``"10s"``.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        server: ModelServer,
        selector_labels: Mapping[str, str] = PROMETHEUS_SELECTOR_LABELS,
        interval: str = "15s",
        scrape_timeout: str = "10s",
    ) -> None:
        super().__init__(
            scope,
            id,
            api_version=_API_VERSION,
            kind="ServiceMonitor",
            metadata=cdk8s.ApiObjectMetadata(name=server.name, labels={**server.labels, **selector_labels}),
        )
        self.add_json_patch(
            cdk8s.JsonPatch.add(
                "/spec",
                {
                    # The job label comes from the app name, not the instance name: every instance shares
                    # the job that dashboards/ and the alert rules query.
                    "jobLabel": APP_NAME_LABEL,
                    "selector": {"matchLabels": server.selector_labels},
                    "endpoints": [
                        {
                            "port": HTTP_PORT_NAME,
                            "path": METRICS,
                            "interval": interval,
                            "scrapeTimeout": scrape_timeout,
                        }
                    ],
                },
            )
        )


class PrometheusRule(cdk8s.ApiObject):
    """A ``PrometheusRule`` holding alert rule groups.

    Args:
        scope, id: as for any construct.
        name: object name.
        groups: rule-file ``groups`` entries (``{"name", "rules": [...]}``).
        labels: extra labels. Default: none.
        selector_labels: labels Prometheus selects rules by. Default: ``PROMETHEUS_SELECTOR_LABELS``.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        name: str,
        groups: Sequence[Mapping[str, Any]],
        labels: Mapping[str, str] | None = None,
        selector_labels: Mapping[str, str] = PROMETHEUS_SELECTOR_LABELS,
    ) -> None:
        super().__init__(
            scope,
            id,
            api_version=_API_VERSION,
            kind="PrometheusRule",
            metadata=cdk8s.ApiObjectMetadata(
                name=name,
                labels={PART_OF_LABEL[0]: PART_OF_LABEL[1], **(labels or {}), **selector_labels},
            ),
        )
        self.add_json_patch(cdk8s.JsonPatch.add("/spec", {"groups": [dict(group) for group in groups]}))


class ModelServerMonitoring(Construct):
    """Everything that watches a ``ModelServer``: ServiceMonitor, PrometheusRule, Grafana dashboards.

    Args:
        scope, id: as for any construct.
        server: the server to watch.
        rule_groups: alert rule groups. Default: ``None``, taken from ``dashboards.alert_rule_groups()``;
            with no groups no PrometheusRule is made.
        dashboards: file name -> dashboard JSON. Default: ``None``, taken from
            ``dashboards.all_dashboards()``; with none no ConfigMap is made.
        dashboards_namespace: namespace of the dashboard ConfigMap. Default: ``MONITORING_NAMESPACE``.
        selector_labels: labels Prometheus selects by. Default: ``PROMETHEUS_SELECTOR_LABELS``.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        server: ModelServer,
        rule_groups: Sequence[Mapping[str, Any]] | None = None,
        dashboards: Mapping[str, Mapping[str, Any]] | None = None,
        dashboards_namespace: str = MONITORING_NAMESPACE,
        selector_labels: Mapping[str, str] = PROMETHEUS_SELECTOR_LABELS,
    ) -> None:
        super().__init__(scope, id)
        rule_groups = default_rule_groups() if rule_groups is None else rule_groups
        dashboards = default_dashboards() if dashboards is None else dashboards
        self.service_monitor = ServiceMonitor(
            self, "service-monitor", server=server, selector_labels=selector_labels
        )
        self.prometheus_rule = (
            PrometheusRule(
                self,
                "prometheus-rule",
                name=server.name,
                groups=rule_groups,
                labels=server.labels,
                selector_labels=selector_labels,
            )
            if rule_groups
            else None
        )
        self.dashboard = (
            GrafanaDashboard(
                self,
                "dashboard",
                name=f"{server.name}-dashboards",
                dashboards=dashboards,
                namespace=dashboards_namespace,
                labels=server.labels,
            )
            if dashboards
            else None
        )
