"""Prometheus alert rules of the model server, as rule-file ``groups`` entries.

Rules select the server's targets by scrape ``job`` (the ServiceMonitor's job label), never by the
dashboard's template variables, and aggregate per ``namespace`` (a deployment) or per ``pod`` (a
replica). Each alert's runbook is a paragraph of the README's "Monitoring" section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dashboards import thresholds as limits
from dashboards.fleet import replica_gauge
from dashboards.promql import quantile, rate, ratio, selector
from service import metrics as m
from service.api import paths

#: Scrape job of the model server's targets (Prometheus Operator names it after the Service).
DEFAULT_JOB = "model-server"

#: Window of the rate-based rules: long enough to smooth a few scrapes, short enough to page fast.
WINDOW = "5m"
#: A failed deployment alerts at least this long, even when a later one succeeded.
DEPLOYMENT_FAILED_WINDOW = "15m"

_GENERATION_ROUTES = f'route=~"{paths.COMPLETION}|{paths.OPENAI_CHAT_COMPLETIONS}"'


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    def rule(self, runbook_url: str | None) -> dict[str, Any]:
        annotations = {"summary": self.summary, "description": self.description}
        if runbook_url is not None:
            # GitHub's anchor of a README heading named after the alert.
            annotations["runbook_url"] = f"{runbook_url}#{self.name.lower()}"
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": annotations,
        }


def _availability(job: str) -> list[Alert]:
    j = f'job="{job}"'
    errors = rate(m.HTTP_REQUESTS_TOTAL, j, 'status=~"5.."', window=WINDOW, group=("namespace", "job"))
    requests = rate(m.HTTP_REQUESTS_TOTAL, j, window=WINDOW, group=("namespace", "job"))
    p95 = quantile(
        0.95,
        m.HTTP_REQUEST_DURATION_SECONDS,
        j,
        _GENERATION_ROUTES,
        window=WINDOW,
        group=("namespace", "job"),
    )
    return [
        Alert(
            "ModelServerDown",
            f"{selector('up', j)} == 0",
            "2m",
            "critical",
            "Model server {{ $labels.namespace }}/{{ $labels.pod }} is down",
            "Prometheus has failed to scrape {{ $labels.instance }} for 2 minutes: the process is not "
            "running or not answering on its metrics port.",
        ),
        Alert(
            "ModelServerHighErrorRatio",
            f"{errors} / {requests} > {limits.ERROR_RATIO_CRITICAL}",
            WINDOW,
            "critical",
            "Model server in {{ $labels.namespace }} answers {{ $value | humanizePercentage }} with 5xx",
            f"More than {limits.ERROR_RATIO_CRITICAL:.0%} of HTTP responses were server errors over "
            f"{WINDOW}, for {WINDOW}.",
        ),
        Alert(
            "ModelServerHighLatency",
            f"{p95} > {limits.LATENCY_SLO_S:g}",
            "10m",
            "warning",
            "Generation p95 latency in {{ $labels.namespace }} is {{ $value | humanizeDuration }}",
            f"The 95th percentile of {paths.COMPLETION} and {paths.OPENAI_CHAT_COMPLETIONS} latency has "
            f"been above the {limits.LATENCY_SLO_S:g} s objective for 10 minutes.",
        ),
        Alert(
            "ModelNotReady",
            f"max by (namespace, pod) ({selector(m.MODEL_READY, j)}) == 0",
            limits.MODEL_NOT_READY_FOR,
            "warning",
            "Model server {{ $labels.namespace }}/{{ $labels.pod }} has no model ready",
            f"The replica has served no model for {limits.MODEL_NOT_READY_FOR}: its first deployment is "
            "still downloading or loading, or failed with no previous model to fall back to.",
        ),
    ]


def _model(job: str) -> list[Alert]:
    j = f'job="{job}"'
    failed = selector(m.DEPLOYMENTS_TOTAL, j, 'result="failed"')
    failed_phase = selector(m.DEPLOYMENT_PHASE, j, 'phase="failed"')
    rejected_full = rate(
        m.REQUESTS_REJECTED_TOTAL, j, 'reason="queue_full"', window=WINDOW, group=("namespace", "pod")
    )
    waiting = f"max by (namespace, pod) (avg_over_time({selector(m.NUM_REQUESTS_WAITING, j)}[{WINDOW}]))"
    queue_share = ratio(
        f"{m.REQUEST_QUEUE_TIME_SECONDS}_sum",
        f"{m.E2E_REQUEST_LATENCY_SECONDS}_sum",
        j,
        window=WINDOW,
        group=("namespace", "pod"),
    )
    return [
        Alert(
            "ModelDeploymentFailed",
            # The phase gauge catches a failure even when the counter's "failed" series is new (increase()
            # misses a series' first sample); the counter catches a failure already followed by a retry.
            f"max by (namespace, pod) ({failed_phase}) == 1"
            f" or sum by (namespace, pod) (increase({failed}[{DEPLOYMENT_FAILED_WINDOW}])) > 0",
            "0m",
            "warning",
            "A model deployment failed on {{ $labels.namespace }}/{{ $labels.pod }}",
            f"The replica's last deployment failed, or one failed within {DEPLOYMENT_FAILED_WINDOW}; it "
            "kept serving its previous model, if it had one.",
        ),
        Alert(
            "ModelServerQueueSaturated",
            f"{rejected_full} > 0 or {waiting} > {limits.QUEUE_WAITING_WARNING}",
            WINDOW,
            "warning",
            "Model server {{ $labels.namespace }}/{{ $labels.pod }} queue is saturated",
            f"Over {WINDOW} the replica refused requests with 429 (queue full) or kept more than "
            f"{limits.QUEUE_WAITING_WARNING} requests waiting for a batch slot: it needs more replicas.",
        ),
        Alert(
            "ModelServerQueueTimeDominates",
            # Without traffic the ratio is 0/0 (no sample), so an idle replica never fires.
            f"{queue_share} > {limits.QUEUE_TIME_SHARE_WARNING:g}",
            "10m",
            "warning",
            "Requests on {{ $labels.namespace }}/{{ $labels.pod }} spend {{ $value | humanizePercentage }} "
            "of their time queued",
            f"For 10 minutes more than {limits.QUEUE_TIME_SHARE_WARNING:.0%} of the engine's request latency "
            "was waiting for a batch slot: requests are slow because the replica is full, not because "
            "the model is slow. Add replicas or batch slots.",
        ),
    ]


def _fleet(job: str) -> list[Alert]:
    """Cluster mode only: the expressions keep replicas that export a desired model (dashboards.fleet)."""
    j = f'job="{job}"'
    replica = "{{ $labels.namespace }}/{{ $labels.pod }}"
    return [
        Alert(
            "ModelServersDisagree",
            f"{replica_gauge(m.FLEET_REPLICA_CONVERGED, j)} == 0",
            limits.ROLLOUT_STUCK_FOR,
            "warning",
            f"Replica {replica} has not converged on the fleet's desired model",
            f"For {limits.ROLLOUT_STUCK_FOR} the replica has not served the model of the desired-state "
            "ConfigMap: a rollout is stuck (download, load) or a failure was not rolled back.",
        ),
        Alert(
            "ModelServerKubeAPIDisconnected",
            f"{replica_gauge(m.KUBE_API_CONNECTED, j)} == 0",
            limits.KUBE_API_DISCONNECTED_FOR,
            "warning",
            f"Replica {replica} lost its watch of the Kubernetes API",
            f"For {limits.KUBE_API_DISCONNECTED_FOR} the replica has not reached the API server: it keeps "
            "serving its model but misses rollouts until it reconnects and re-lists.",
        ),
    ]


def alert_rule_groups(job: str = DEFAULT_JOB, runbook_url: str | None = None) -> list[dict[str, Any]]:
    """The rule-file ``groups``: ``{"name", "rules": [{"alert", "expr", "for", "labels", "annotations"}]}``.

    ``job`` is the scrape job of the server's targets; ``runbook_url`` (the README's address) adds a
    ``runbook_url`` annotation pointing at each alert's paragraph.
    """
    return [
        {"name": "model-serving.availability", "rules": [a.rule(runbook_url) for a in _availability(job)]},
        {"name": "model-serving.model", "rules": [a.rule(runbook_url) for a in _model(job)]},
        {"name": "model-serving.fleet", "rules": [a.rule(runbook_url) for a in _fleet(job)]},
    ]
