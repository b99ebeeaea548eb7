"""``GrafanaDashboard``: a ConfigMap that Grafana's dashboard sidecar picks up."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from constructs import Construct

from infra_constructs._k8s import k8s
from infra_constructs.conventions import (
    GRAFANA_DASHBOARD_LABEL,
    GRAFANA_FOLDER,
    GRAFANA_FOLDER_ANNOTATION,
    MONITORING_NAMESPACE,
    PART_OF_LABEL,
)


class GrafanaDashboard(Construct):
    """One ConfigMap holding Grafana dashboards as JSON files, labelled for the sidecar.

    Args:
        scope, id: as for any construct.
        name: ConfigMap name.
        dashboards: file name (``*.json``) -> dashboard JSON model.
        namespace: where the ConfigMap lives. Default: ``MONITORING_NAMESPACE``: the sidecar of
            kube-prometheus-stack watches only Grafana's own namespace unless told otherwise.
        sidecar_label: the ``(key, value)`` label the sidecar looks for. Default:
            ``GRAFANA_DASHBOARD_LABEL`` (``grafana_dashboard: "1"``).
        folder: Grafana folder, set through the ``GRAFANA_FOLDER_ANNOTATION`` annotation. Default:
            ``GRAFANA_FOLDER``.
        labels: extra labels. Default: none.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        name: str,
        dashboards: Mapping[str, Mapping[str, Any]],
        namespace: str = MONITORING_NAMESPACE,
        sidecar_label: tuple[str, str] = GRAFANA_DASHBOARD_LABEL,
        folder: str = GRAFANA_FOLDER,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(scope, id)
        self.config_map = k8s.KubeConfigMap(
            self,
            "config-map",
            metadata=k8s.ObjectMeta(
                name=name,
                namespace=namespace,
                labels={
                    PART_OF_LABEL[0]: PART_OF_LABEL[1],
                    **(labels or {}),
                    sidecar_label[0]: sidecar_label[1],
                },
                annotations={GRAFANA_FOLDER_ANNOTATION: folder},
            ),
            data={
                file_name: json.dumps(dashboard, indent=1, sort_keys=True)
                for file_name, dashboard in dashboards.items()
            },
        )
