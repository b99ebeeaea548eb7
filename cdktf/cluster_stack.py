"""Cluster foundation as code: the namespaces and the kube-prometheus-stack Helm release.

These are cluster-level and long-lived, so they live in Terraform state (CDK Terrain) rather than in
the ``kubectl apply`` flow of ``synth.py``. Every name Prometheus or Grafana matches on comes from
``infra_constructs.conventions``, the module the cdk8s constructs import too.

Resource budget: the reference machine gives the cluster 6 CPU / 12 GiB, and the model server requests
2 CPU / 4 GiB of it at a rollout's peak (two pods of 1 CPU / 2 GiB during a model swap). The requests
below total ~0.6 CPU / ~1 GiB, so the stack also schedules on the smaller
``minikube start --cpus 4 --memory 8g`` next to the model server and the control plane (~0.75 CPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cdktn import LocalBackend, TerraformOutput, TerraformStack, TerraformVariable
from cdktn_provider_helm.provider import HelmProvider, HelmProviderKubernetes
from cdktn_provider_helm.release import Release
from cdktn_provider_kubernetes.namespace_v1 import NamespaceV1, NamespaceV1Metadata
from cdktn_provider_kubernetes.provider import KubernetesProvider
from constructs import Construct

from infra_constructs.conventions import (
    APP_NAMESPACE,
    GRAFANA_DASHBOARD_LABEL,
    GRAFANA_FOLDER_ANNOTATION,
    MONITORING_NAMESPACE,
    PART_OF_LABEL,
    PROMETHEUS_STACK_RELEASE,
)

#: Newest kube-prometheus-stack release found at the time of writing (published 2026-09-13).
#: Pinned so that an apply is reproducible; bump deliberately and re-run the tests.
KUBE_PROMETHEUS_STACK_VERSION = "91.5.0"
PROMETHEUS_COMMUNITY_REPO = "https://prometheus-community.github.io/helm-charts"
#: Stack id of the app; also names the state file, cdktf/terraform.<id>.tfstate.
STACK_ID = "cluster"
#: Grafana's port on the chart's Service (the container listens on 3000).
GRAFANA_SERVICE_PORT = 80


def _resources(cpu: str, memory: str, cpu_limit: str, memory_limit: str) -> dict[str, dict[str, str]]:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu_limit, "memory": memory_limit}}


@dataclass(frozen=True)
class ClusterFoundationProps:
    """What the cluster foundation creates; every default fits a laptop cluster."""

    #: Namespace of the model server (``synth.py`` deploys into it). Default: conventions.APP_NAMESPACE.
    app_namespace: str = APP_NAMESPACE
    #: Namespace of the monitoring stack. Default: conventions.MONITORING_NAMESPACE.
    monitoring_namespace: str = MONITORING_NAMESPACE
    #: Helm release name; also the ``release`` label the chart puts on its own monitors.
    #: Default: conventions.PROMETHEUS_STACK_RELEASE.
    release_name: str = PROMETHEUS_STACK_RELEASE
    #: kube-prometheus-stack chart version. Default: KUBE_PROMETHEUS_STACK_VERSION.
    chart_version: str = KUBE_PROMETHEUS_STACK_VERSION
    #: Helm repository of the chart. Default: the prometheus-community repository.
    chart_repository: str = PROMETHEUS_COMMUNITY_REPO
    #: Seconds Helm waits for every object to become ready before rolling back. Default: 600
    #: (image pulls on a cold CI cluster take minutes).
    timeout_s: int = 600
    #: How long Prometheus keeps samples. Default: 2d (its storage is an emptyDir on a laptop).
    retention: str = "2d"
    #: Scrape etcd, the scheduler, the controller manager and kube-proxy. Default: False, because on
    #: minikube/kind they listen on localhost only and would just fire TargetDown alerts.
    scrape_control_plane: bool = False


def kube_prometheus_stack_values(props: ClusterFoundationProps) -> dict[str, Any]:
    """The chart values, as data: what makes our ServiceMonitor, PrometheusRule and dashboards visible."""
    dashboard_label, dashboard_label_value = GRAFANA_DASHBOARD_LABEL
    # An unset selector with NilUsesHelmValues=false renders `{}`: Prometheus then selects every
    # ServiceMonitor/PodMonitor/Probe/PrometheusRule in every namespace (the namespace selectors stay
    # at their default `{}`), so it finds ours in the app namespace whatever the release is called.
    # Our objects still carry conventions.PROMETHEUS_SELECTOR_LABELS for a stock install.
    prometheus_spec = {
        f"{kind}SelectorNilUsesHelmValues": False
        for kind in ("serviceMonitor", "podMonitor", "probe", "rule", "scrapeConfig")
    }
    control_plane = {"enabled": props.scrape_control_plane}
    return {
        "prometheus": {
            "prometheusSpec": {
                **prometheus_spec,
                "retention": props.retention,
                "resources": _resources("300m", "512Mi", "1", "1536Mi"),
            }
        },
        "alertmanager": {"alertmanagerSpec": {"resources": _resources("25m", "64Mi", "100m", "128Mi")}},
        "prometheusOperator": {"resources": _resources("50m", "64Mi", "200m", "256Mi")},
        "kube-state-metrics": {"resources": _resources("25m", "64Mi", "100m", "128Mi")},
        "prometheus-node-exporter": {"resources": _resources("25m", "32Mi", "100m", "64Mi")},
        "grafana": {
            "resources": _resources("100m", "192Mi", "500m", "384Mi"),
            "sidecar": {
                # Shared by the dashboard and datasource sidecars.
                "resources": _resources("25m", "64Mi", "100m", "128Mi"),
                "dashboards": {
                    "enabled": True,
                    "label": dashboard_label,
                    "labelValue": dashboard_label_value,
                    "searchNamespace": "ALL",
                    "folderAnnotation": GRAFANA_FOLDER_ANNOTATION,
                    # Required for folderAnnotation to turn into Grafana folders.
                    "provider": {"foldersFromFilesStructure": True},
                },
            },
        },
        "kubeEtcd": control_plane,
        "kubeScheduler": control_plane,
        "kubeControllerManager": control_plane,
        "kubeProxy": control_plane,
    }


class ClusterFoundation(Construct):
    """The app and monitoring namespaces plus the kube-prometheus-stack release, with outputs.

    Uses the stack's default ``kubernetes`` and ``helm`` providers; see ``ClusterStack``.
    """

    def __init__(self, scope: Construct, id: str, props: ClusterFoundationProps | None = None) -> None:
        super().__init__(scope, id)
        props = props or ClusterFoundationProps()
        labels = dict([PART_OF_LABEL])

        self.app_namespace = NamespaceV1(
            self,
            "app-namespace",
            metadata=[
                NamespaceV1Metadata(
                    name=props.app_namespace,
                    # The model server runs non-root and read-only: enforce baseline, warn on restricted.
                    labels={
                        **labels,
                        "pod-security.kubernetes.io/enforce": "baseline",
                        "pod-security.kubernetes.io/warn": "restricted",
                    },
                )
            ],
        )
        # No pod-security label here: node-exporter needs host networking, PID and paths.
        self.monitoring_namespace = NamespaceV1(
            self,
            "monitoring-namespace",
            metadata=[NamespaceV1Metadata(name=props.monitoring_namespace, labels=labels)],
        )
        self.release = Release(
            self,
            "kube-prometheus-stack",
            name=props.release_name,
            chart="kube-prometheus-stack",
            repository=props.chart_repository,
            version=props.chart_version,
            namespace=props.monitoring_namespace,
            create_namespace=False,
            values=[json.dumps(kube_prometheus_stack_values(props), indent=2, sort_keys=True)],
            # CI-friendly: block until ready, roll back a failed install/upgrade, keep little history.
            atomic=True,
            wait=True,
            cleanup_on_fail=True,
            timeout=props.timeout_s,
            max_history=5,
            depends_on=[self.monitoring_namespace],
        )

        grafana_service = f"svc/{props.release_name}-grafana"
        outputs = {
            "app_namespace": props.app_namespace,
            "monitoring_namespace": props.monitoring_namespace,
            "release_name": props.release_name,
            "grafana_port_forward": (
                f"kubectl -n {props.monitoring_namespace} port-forward {grafana_service} "
                f"3000:{GRAFANA_SERVICE_PORT}  # then open http://localhost:3000"
            ),
            "grafana_admin_password": (
                f"kubectl -n {props.monitoring_namespace} get secret {props.release_name}-grafana "
                "-o jsonpath='{.data.admin-password}' | base64 -d"
            ),
        }
        for name, value in outputs.items():
            # Plain output names (`cdktn output`, `terraform output app_namespace`), not hashed ids.
            TerraformOutput(self, name, value=value).override_logical_id(name)


class ClusterStack(TerraformStack):
    """A stack with the kubeconfig as Terraform variables, a relative local backend and the foundation.

    ``TF_VAR_kubeconfig_path`` / ``TF_VAR_kube_context`` (or ``cdktn deploy --var ...``) pick the
    cluster at deploy time, without re-synthesizing.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        props: ClusterFoundationProps | None = None,
        kubeconfig_path: str = "~/.kube/config",
        kube_context: str = "",
    ) -> None:
        super().__init__(scope, id)
        # The default backend writes an absolute path of the synth machine; this one resolves from
        # cdktf.out/stacks/<id>/ to cdktf/terraform.<id>.tfstate on any machine.
        LocalBackend(self, path=f"../../../terraform.{id}.tfstate")
        config_path = TerraformVariable(
            self,
            "kubeconfig_path",
            type="string",
            default=kubeconfig_path,
            description="kubeconfig file; the providers expand ~.",
        ).string_value
        config_context = TerraformVariable(
            self,
            "kube_context",
            type="string",
            default=kube_context,
            description="kubeconfig context; empty means the file's current context.",
        ).string_value
        KubernetesProvider(self, "kubernetes", config_path=config_path, config_context=config_context)
        HelmProvider(
            self,
            "helm",
            kubernetes=HelmProviderKubernetes(config_path=config_path, config_context=config_context),
        )
        self.foundation = ClusterFoundation(self, "foundation", props)
