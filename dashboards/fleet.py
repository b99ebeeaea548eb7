"""The fleet (cluster mode): the desired model every replica converges on, rollouts, and each replica's
connection to the Kubernetes API. Queries shared by the dashboard's Fleet row and the fleet alerts.

A replica is in cluster mode when it exports ``serving_fleet_desired_model_info`` (it has read the
desired-state ConfigMap). Without cluster mode the server still exports its unlabelled fleet gauges, at
0, so every per-replica fleet query is restricted to cluster-mode replicas: a single server is never
shown as "disconnected" or "not converged".
"""

from __future__ import annotations

from dashboards import thresholds as limits
from dashboards.panels import (
    GREEN,
    RED,
    YELLOW,
    Builder,
    Query,
    single_stat,
    state_timeline,
    time_series,
    value_text,
)
from dashboards.promql import DASHBOARD_SELECTOR, RATE_INTERVAL, quantile, selector
from service import metrics as m

#: Labels that name one replica.
REPLICA = ("namespace", "pod")
_ON_REPLICA = f"on ({', '.join(REPLICA)})"


def cluster_mode_replicas(*matchers: str) -> str:
    """One series per replica in cluster mode (value 1)."""
    return f"max by ({', '.join(REPLICA)}) ({selector(m.FLEET_DESIRED_MODEL_INFO, *matchers)})"


def replica_gauge(metric: str, *matchers: str) -> str:
    """A fleet gauge per replica, for cluster-mode replicas only."""
    per_replica = f"max by ({', '.join(REPLICA)}) ({selector(metric, *matchers)})"
    return f"({per_replica} and {_ON_REPLICA} {cluster_mode_replicas(*matchers)})"


def desired_model(*matchers: str) -> str:
    """The desired model as the replicas read it: one series per (model_id, revision)."""
    return f"max by (model_id, revision) ({selector(m.FLEET_DESIRED_MODEL_INFO, *matchers)} == 1)"


_S = DASHBOARD_SELECTOR
_W = RATE_INTERVAL


def _replica_timeline(
    title: str, description: str, gauge: str, zero: tuple[str, str], one: tuple[str, str]
) -> Builder:
    """One lane per cluster-mode replica of a 0/1 fleet gauge, each value shown as (text, colour)."""
    return state_timeline(
        title,
        description,
        Query(replica_gauge(gauge, _S), "{{pod}}"),
        width=9,
        height=6,
        mappings=value_text({"0": zero, "1": one}),
    )


def fleet_panels() -> list[Builder]:
    """The dashboard's Fleet row: desired model, convergence and API connection per replica, rollouts."""
    return [
        single_stat(
            "Desired model",
            "The model the fleet converges on, from the desired-state ConfigMap (cluster mode only).",
            Query(desired_model(_S), "{{model_id}} {{revision}}"),
            unit="none",
            width=6,
            height=6,
            show_name=True,
        ),
        _replica_timeline(
            "Converged on the desired model",
            "Per replica: serving the desired model, or not yet (a rollout in progress, stuck or rolling "
            f"back). ModelServersDisagree fires after {limits.ROLLOUT_STUCK_FOR} not converged.",
            m.FLEET_REPLICA_CONVERGED,
            ("Converging", YELLOW),
            ("Converged", GREEN),
        ),
        _replica_timeline(
            "Kubernetes API connection",
            "Per replica: its watch of the desired-state ConfigMap is established, or lost (the replica "
            "keeps serving and re-lists when it can).",
            m.KUBE_API_CONNECTED,
            ("Disconnected", RED),
            ("Connected", GREEN),
        ),
        time_series(
            "Fleet rollouts",
            "Rollouts that ended, by outcome (ready, rolled_back). Every replica counts the rollouts it "
            "took part in, so the most any replica saw is shown.",
            [
                Query(
                    f"max by (outcome) (increase({selector(m.FLEET_ROLLOUTS_TOTAL, _S)}[{_W}]))",
                    "{{outcome}}",
                )
            ],
            unit="short",
            width=12,
            height=6,
            bars=True,
        ),
        time_series(
            "Rollout duration p50 / p95",
            "Time from a replica seeing a new desired model to serving it (download, load, warm-up).",
            [
                Query(quantile(q, m.FLEET_ROLLOUT_DURATION_SECONDS, _S, window=_W), f"p{round(q * 100)}")
                for q in (0.5, 0.95)
            ],
            unit="s",
            width=12,
            height=6,
        ),
    ]
