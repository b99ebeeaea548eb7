"""Names shared by the cdk8s constructs (``synth.py``) and the CDK Terrain stack (``cdktf/``).

Both sides import these, so the namespaces, the labels Prometheus selects by and the label
Grafana's dashboard sidecar discovers can never drift apart.
"""

#: Namespace of the model server's workload objects.
APP_NAMESPACE = "model-serving"
#: Namespace of kube-prometheus-stack.
MONITORING_NAMESPACE = "monitoring"
#: Helm release name of kube-prometheus-stack.
PROMETHEUS_STACK_RELEASE = "kube-prometheus-stack"
#: Label kube-prometheus-stack's Prometheus selects ServiceMonitors/PrometheusRules by (its default).
PROMETHEUS_SELECTOR_LABELS = {"release": PROMETHEUS_STACK_RELEASE}
#: Label Grafana's dashboard sidecar looks for on ConfigMaps (kube-prometheus-stack default).
GRAFANA_DASHBOARD_LABEL = ("grafana_dashboard", "1")
#: Annotation the sidecar reads to file a dashboard into a folder.
GRAFANA_FOLDER_ANNOTATION = "grafana_folder"
GRAFANA_FOLDER = "Model serving"
#: Common label of every object this project creates.
PART_OF_LABEL = ("app.kubernetes.io/part-of", "model-serving")
