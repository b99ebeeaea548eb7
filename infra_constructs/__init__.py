"""Reusable cdk8s constructs for the model server: its workload, its monitoring, its dashboards.

from cdk8s import App, Chart
from infra_constructs import ModelServer, ModelServerMonitoring

chart = Chart(App(), "chat", namespace="ml")
server = ModelServer(chart, "chat", model_id="HuggingFaceTB/SmolLM2-360M-Instruct", replicas=2)
ModelServerMonitoring(chart, "chat-monitoring", server=server)
"""

from infra_constructs._k8s import NEWEST_K8S_VERSION, OLDEST_K8S_VERSION
from infra_constructs.grafana import GrafanaDashboard
from infra_constructs.model_server import (
    DEFAULT_IMAGE,
    Autoscaling,
    ModelCache,
    ModelServer,
    NetworkPolicyOptions,
    Resources,
    SecretKeyRef,
)
from infra_constructs.monitoring import ModelServerMonitoring, PrometheusRule, ServiceMonitor

__all__ = [
    "DEFAULT_IMAGE",
    "NEWEST_K8S_VERSION",
    "OLDEST_K8S_VERSION",
    "Autoscaling",
    "GrafanaDashboard",
    "ModelCache",
    "ModelServer",
    "ModelServerMonitoring",
    "NetworkPolicyOptions",
    "PrometheusRule",
    "Resources",
    "SecretKeyRef",
    "ServiceMonitor",
]
