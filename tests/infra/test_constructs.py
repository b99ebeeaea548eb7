"""The cdk8s constructs and ``synth.py``: objects asserted field by field, then validated.

``synth.py`` runs twice per module (defaults, every option); every test reads those manifests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import cdk8s
import kubernetes_validate
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
from pydantic import BaseModel

import synth
from dashboards import alert_rule_groups, all_dashboards
from dashboards.alerts import DEFAULT_JOB
from infra_constructs import (
    NEWEST_K8S_VERSION,
    OLDEST_K8S_VERSION,
    ModelServer,
    ModelServerMonitoring,
)
from infra_constructs.conventions import (
    APP_NAMESPACE,
    GRAFANA_DASHBOARD_LABEL,
    GRAFANA_FOLDER,
    GRAFANA_FOLDER_ANNOTATION,
    MONITORING_NAMESPACE,
    PART_OF_LABEL,
    PROMETHEUS_SELECTOR_LABELS,
)
from infra_constructs.model_server import APP_NAME, SERVICE_ACCOUNT_DIR, env_name
from service import tracing
from service.api.paths import HEALTHZ, HTTP_PORT_NAME, METRICS, READYZ
from service.settings import BUNDLED_MODEL_ALIAS, DEFAULT_PORT, ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

FULL_OPTIONS = [
    "--namespace", "ml",
    "--name", "chat",
    "--image", "registry.example/model-serving@sha256:" + "0" * 64,
    "--image-pull-policy", "Always",
    "--model", "HuggingFaceTB/SmolLM2-360M-Instruct",
    "--revision", "v1.0",
    "--replicas", "3",
    "--cpu-request", "2", "--memory-request", "4Gi", "--cpu-limit", "4", "--memory-limit", "8Gi",
    "--shm-size", "2Gi",
    "--model-cache-pvc", "hf-cache",
    "--autoscaling", "--min-replicas", "2", "--max-replicas", "5", "--target-cpu", "60",
    "--allow-namespace", "ingress-nginx", "--allow-namespace", MONITORING_NAMESPACE,
    "--admin-secret", "chat-token", "--admin-secret-key", "admin", "--admin-secret-optional",
    "--max-running-requests", "8", "--max-queued-requests", "32",
    "--shutdown-grace-s", "60",
    "--otlp-endpoint", "http://otel-collector.monitoring:4318",
    "--dashboards-namespace", "grafana",
]  # fmt: skip


def synthesize(out: Path, *options: str) -> list[dict[str, Any]]:
    files = synth.main(["--out", str(out), *options])
    return [doc for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [doc for doc in docs if doc["kind"] == kind]
    return found


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def dashboards_config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    key, value = GRAFANA_DASHBOARD_LABEL
    [found] = [
        doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["labels"].get(key) == value
    ]
    return found


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("default")


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("full")


@pytest.fixture(scope="module")
def default_docs(default_dir: Path) -> list[dict[str, Any]]:
    return synthesize(default_dir)


@pytest.fixture(scope="module")
def full_docs(full_dir: Path) -> list[dict[str, Any]]:
    return synthesize(full_dir, *FULL_OPTIONS)


@pytest.fixture(scope="module", params=["default", "full"])
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return request.getfixturevalue(f"{request.param}_docs")


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [server] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return server


def env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in container(docs)["env"]}


# --- the default run -------------------------------------------------------------------------------


def test_default_run_writes_the_workload_and_the_monitoring_files(default_dir: Path, default_docs) -> None:
    assert sorted(p.name for p in default_dir.iterdir()) == [
        f"{APP_NAMESPACE}.k8s.yaml",
        f"{synth.MONITORING_CHART}.k8s.yaml",
    ]
    assert kinds(default_docs) == [
        "ConfigMap",  # the dashboards
        "ConfigMap",  # the desired model (cluster mode)
        "Deployment",
        "NetworkPolicy",
        "PrometheusRule",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


def test_defaults_serve_the_bundled_model_on_all_interfaces(default_docs) -> None:
    values = env(default_docs)
    assert (
        named(default_docs, "ConfigMap", "model-server-desired-model")["data"]["model_id"]
        == BUNDLED_MODEL_ALIAS
    )
    assert values[env_name("host")] == "0.0.0.0"
    assert values[env_name("port")] == str(DEFAULT_PORT)
    assert env_name("max_running_requests") not in values  # the server's own default applies
    deployment = one(default_docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    dashboards = dashboards_config_map(default_docs)
    assert all(doc["metadata"]["namespace"] == APP_NAMESPACE for doc in default_docs if doc is not dashboards)


def test_resources_default_to_the_single_node_budget(default_docs) -> None:
    resources = container(default_docs)["resources"]
    assert resources["limits"] == {"cpu": "6", "memory": "12Gi"}
    assert resources["requests"] == {"cpu": "1", "memory": "2Gi"}


def test_pod_is_locked_down(default_docs) -> None:
    pod = one(default_docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert one(default_docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == one(default_docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(default_docs)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] > 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_every_written_path_is_a_volume(default_docs) -> None:
    """A read-only root filesystem: state dir, HF_HOME, /tmp and /dev/shm must be mounted volumes."""
    mounts = {m["mountPath"]: m["name"] for m in container(default_docs)["volumeMounts"]}
    values = env(default_docs)
    for path in (values[env_name("state_dir")], values["HF_HOME"], "/tmp", "/dev/shm"):
        assert any(path == mount or path.startswith(mount + "/") for mount in mounts), path
    volumes = {v["name"]: v for v in one(default_docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert set(mounts.values()) == set(volumes)
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts[values["HF_HOME"]]]


def test_admin_token_comes_from_a_secret(default_docs) -> None:
    [token] = [var for var in container(default_docs)["env"] if var["name"] == env_name("admin_token")]
    assert "value" not in token
    assert token["valueFrom"]["secretKeyRef"] == {
        "name": "model-server-admin",
        "key": "token",
        "optional": False,
    }


def test_probes_hit_paths_and_the_port_the_server_serves(docs) -> None:
    server = container(docs)
    assert [p["name"] for p in server["ports"]] == [HTTP_PORT_NAME]
    probes = {name: server[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {name: probe["path"] for name, probe in probes.items()} == {
        "startupProbe": READYZ,
        "readinessProbe": READYZ,
        "livenessProbe": HEALTHZ,
    }
    assert {probe["port"] for probe in probes.values()} == {HTTP_PORT_NAME}
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60  # a cold model download


def test_rollout_never_drops_below_the_ready_pods(docs) -> None:
    deployment = one(docs, "Deployment")["spec"]
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["progressDeadlineSeconds"] > 30 * 60
    pod = deployment["template"]["spec"]
    pre_stop = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    shutdown_grace = float(env(docs)[env_name("shutdown_grace_s")])
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[-1]) + shutdown_grace


def test_service_and_monitor_select_the_pods_and_their_port(docs) -> None:
    deployment = one(docs, "Deployment")["spec"]
    pod_labels = deployment["template"]["metadata"]["labels"]
    assert deployment["selector"]["matchLabels"].items() <= pod_labels.items()
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["name"] == HTTP_PORT_NAME and port["targetPort"] == HTTP_PORT_NAME
    if "ServiceMonitor" in kinds(docs):
        monitor = one(docs, "ServiceMonitor")
        assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint["port"] == port["name"] and endpoint["path"] == METRICS
        assert PROMETHEUS_SELECTOR_LABELS.items() <= monitor["metadata"]["labels"].items()
        # The scrape job (from jobLabel) is what the alert rules and dashboards query.
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == APP_NAME == DEFAULT_JOB


def test_network_policy_admits_monitoring_on_the_http_port(docs) -> None:
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"port": HTTP_PORT_NAME, "protocol": "TCP"}]
    namespaces = [
        peer["namespaceSelector"]["matchLabels"] for peer in rule["from"] if "namespaceSelector" in peer
    ]
    assert {"kubernetes.io/metadata.name": MONITORING_NAMESPACE} in namespaces


def test_monitoring_carries_the_rules_and_dashboards_of_dashboards_package(default_docs) -> None:
    assert one(default_docs, "PrometheusRule")["spec"]["groups"] == alert_rule_groups()
    config_map = dashboards_config_map(default_docs)
    assert config_map["metadata"]["namespace"] == MONITORING_NAMESPACE
    assert config_map["metadata"]["annotations"] == {GRAFANA_FOLDER_ANNOTATION: GRAFANA_FOLDER}
    assert {name: json.loads(text) for name, text in config_map["data"].items()} == all_dashboards()
    assert all(doc["metadata"]["labels"][PART_OF_LABEL[0]] == PART_OF_LABEL[1] for doc in default_docs)


# --- every option ----------------------------------------------------------------------------------


def test_every_option_lands_in_the_objects(full_dir: Path, full_docs) -> None:
    assert sorted(p.name for p in full_dir.iterdir()) == ["ml.k8s.yaml", f"{synth.MONITORING_CHART}.k8s.yaml"]
    assert all(doc["metadata"]["name"].startswith("chat") for doc in full_docs)
    values = env(full_docs)
    assert values[env_name("max_running_requests")] == "8"
    assert values[env_name("max_queued_requests")] == "32"
    assert values[env_name("shutdown_grace_s")] == "60.0"
    assert values[env_name("admin_token")]["secretKeyRef"] == {
        "name": "chat-token",
        "key": "admin",
        "optional": True,
    }
    server = container(full_docs)
    assert server["image"].endswith("@sha256:" + "0" * 64) and server["imagePullPolicy"] == "Always"
    assert server["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }
    volumes = {v["name"]: v for v in one(full_docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache"}
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "2Gi"
    dashboards = dashboards_config_map(full_docs)
    assert dashboards["metadata"]["namespace"] == "grafana"
    assert all(doc["metadata"]["namespace"] == "ml" for doc in full_docs if doc is not dashboards)


def test_otlp_endpoint_turns_tracing_on(default_docs, full_docs) -> None:
    assert not [name for name in env(default_docs) if name.startswith("OTEL_")]
    values = env(full_docs)
    otel = {name: value for name, value in values.items() if name.startswith("OTEL_")}
    assert otel["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.monitoring:4318"
    assert otel["OTEL_SERVICE_NAME"] == "chat"
    excluded = otel["OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS"].split(",")
    assert {f"/{path}" for path in excluded} == {HEALTHZ, READYZ, METRICS}
    # The server reads exactly these variables to switch its exporter on.
    provider = tracing.provider_from_environment(otel)
    assert provider is not None
    provider.shutdown()


def test_autoscaling_owns_the_replica_count(full_docs) -> None:
    deployment = one(full_docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # a re-apply must not reset what the HPA chose
    hpa = one(full_docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}
    pdb = one(full_docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_network_policy_namespaces_are_configurable(full_docs) -> None:
    [rule] = one(full_docs, "NetworkPolicy")["spec"]["ingress"]
    names = [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in rule["from"][:-1]]
    assert names == ["ingress-nginx", MONITORING_NAMESPACE]


def test_replicas_above_one_add_a_disruption_budget_and_flags_drop_objects(tmp_path: Path) -> None:
    (tmp_path / f"{synth.MONITORING_CHART}.k8s.yaml").write_text("stale")  # an earlier run's file
    docs = synthesize(
        tmp_path, "--replicas", "2", "--no-monitoring", "--no-network-policy", "--no-cluster-mode"
    )
    assert kinds(docs) == ["Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [f"{APP_NAMESPACE}.k8s.yaml"]


def test_help_documents_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "synth.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "1000"},  # argparse would wrap lines, even inside words
    )
    flags = {arg for arg in FULL_OPTIONS if arg.startswith("--")} | {
        "--out",
        "--no-monitoring",
        "--no-cluster-mode",
    }
    assert all(flag in result.stdout for flag in flags)
    assert "pods (without --autoscaling) (default: 1)" in result.stdout
    assert f"(default: {APP_NAMESPACE})" in result.stdout


def test_constructs_validate_their_props() -> None:
    chart = cdk8s.Chart(cdk8s.App(), "chart")
    with pytest.raises(ValueError, match="replicas"):
        ModelServer(chart, "zero", replicas=0)
    with pytest.raises(KeyError, match="no_such_setting"):
        env_name("no_such_setting")


# --- cluster mode: desired state and least privilege ----------------------------------------------

#: The desired-state ConfigMap's keys, as the contract with the server's reconciler lists them.
DESIRED_KEYS = {
    "model_id", "revision", "previous_model_id", "previous_revision", "rollout_id", "rollout_outcome",
    "rollout_reason", "rollout_failed_replica", "updated_at",
}  # fmt: skip


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("which", "name", "model_id", "revision"),
    [
        ("default", "model-server", BUNDLED_MODEL_ALIAS, ""),
        ("full", "chat", "HuggingFaceTB/SmolLM2-360M-Instruct", "v1.0"),
    ],
)
def test_desired_model_config_map_is_synthesized_with_the_model(
    request: pytest.FixtureRequest, which: str, name: str, model_id: str, revision: str
) -> None:
    docs = request.getfixturevalue(f"{which}_docs")
    config_map = named(docs, "ConfigMap", f"{name}-desired-model")
    deployment = one(docs, "Deployment")
    assert config_map["metadata"]["labels"] == deployment["metadata"]["labels"]
    assert config_map["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    data = config_map["data"]
    assert set(data) == DESIRED_KEYS
    assert (data["model_id"], data["revision"]) == (model_id, revision)
    assert all(value == "" for key, value in data.items() if key not in ("model_id", "revision"))
    # The pods do not carry the model: changing it must not restart them (the replicas swap in place).
    assert env_name("model") not in env(docs) and env_name("revision") not in env(docs)


def test_cluster_mode_settings_reach_the_server(full_docs) -> None:
    values = env(full_docs)
    assert values[f"{ENV_PREFIX}CLUSTER_MODE"] == "true"
    assert values[f"{ENV_PREFIX}CLUSTER_CONFIGMAP"] == "chat-desired-model"
    assert values[f"{ENV_PREFIX}CLUSTER_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert values[f"{ENV_PREFIX}POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The label selector the server lists its fleet with picks exactly the Deployment's pods.
    selector = dict(term.split("=") for term in values[f"{ENV_PREFIX}CLUSTER_POD_SELECTOR"].split(","))
    assert selector == one(full_docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/instance"] == "chat"


@pytest.mark.skipif(
    "cluster_mode" not in Settings.model_fields, reason="the cluster-mode settings land with the fleet server"
)
def test_every_serving_env_var_is_a_server_setting(default_docs) -> None:
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert {name for name in env(default_docs) if name.startswith(ENV_PREFIX)} <= settings


def test_role_grants_only_what_a_replica_needs(docs) -> None:
    role = one(docs, "Role")
    config_map = named(docs, "ConfigMap", env(docs)[f"{ENV_PREFIX}CLUSTER_CONFIGMAP"])
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [config_map["metadata"]["name"]],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]},
    ]
    assert role["metadata"]["namespace"] == config_map["metadata"]["namespace"]


def test_role_binding_binds_the_role_to_the_pods_service_account(docs) -> None:
    binding, role = one(docs, "RoleBinding"), one(docs, "Role")
    account = one(docs, "ServiceAccount")["metadata"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert pod_spec(docs)["serviceAccountName"] == account["name"]


def test_token_is_projected_short_lived_and_never_automounted(docs) -> None:
    pod = pod_spec(docs)
    assert pod["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    [mount] = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == SERVICE_ACCOUNT_DIR]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["projected"]["sources"] == [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {
            "downwardAPI": {
                "items": [
                    {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                ]
            }
        },
    ]


def test_network_policy_leaves_egress_to_the_api_server_open(docs) -> None:
    # The policy governs ingress only; egress (hub downloads, the API server on 443/6443) stays open.
    assert one(docs, "NetworkPolicy")["spec"]["policyTypes"] == ["Ingress"]


def test_without_cluster_mode_no_fleet_objects_token_or_settings(tmp_path: Path) -> None:
    docs = synthesize(
        tmp_path, "--no-cluster-mode", "--no-monitoring", "--model", "org/m", "--revision", "v2"
    )
    assert kinds(docs) == ["Deployment", "NetworkPolicy", "Service", "ServiceAccount"]
    assert (env(docs)[env_name("model")], env(docs)[env_name("revision")]) == ("org/m", "v2")
    assert not [name for name in env(docs) if "CLUSTER" in name or name == f"{ENV_PREFIX}POD_NAME"]
    assert pod_spec(docs)["automountServiceAccountToken"] is False
    assert not [v for v in pod_spec(docs)["volumes"] if "projected" in v]
    assert SERVICE_ACCOUNT_DIR not in {m["mountPath"] for m in container(docs)["volumeMounts"]}


def test_cluster_mode_needs_the_chart_namespace() -> None:
    chart = cdk8s.Chart(cdk8s.App(), "chart")  # no namespace: the RoleBinding could not name the account
    with pytest.raises(ValueError, match="namespace"):
        ModelServer(chart, "server")
    assert ModelServer(chart, "independent", cluster_mode=False).role is None


# --- the hook into dashboards/ ---------------------------------------------------------------------


@pytest.mark.parametrize("stand_in", [types.ModuleType("dashboards"), None], ids=["without-hooks", "absent"])
def test_monitoring_is_empty_safe_without_dashboards(monkeypatch: pytest.MonkeyPatch, stand_in) -> None:
    monkeypatch.setitem(sys.modules, "dashboards", stand_in)  # None makes the import fail
    chart = cdk8s.Chart(cdk8s.App(), "chart", namespace=APP_NAMESPACE)
    monitoring = ModelServerMonitoring(chart, "monitoring", server=ModelServer(chart, "server"))
    assert monitoring.prometheus_rule is None and monitoring.dashboard is None
    assert "ServiceMonitor" in kinds(cdk8s.Testing.synth(chart))


def test_explicit_rules_and_dashboards_win() -> None:
    chart = cdk8s.Chart(cdk8s.App(), "chart", namespace=APP_NAMESPACE)
    group = {"name": "mine", "rules": [{"alert": "Mine", "expr": "vector(1)"}]}
    ModelServerMonitoring(
        chart,
        "monitoring",
        server=ModelServer(chart, "server"),
        rule_groups=[group],
        dashboards={"a.json": {}},
    )
    docs = cdk8s.Testing.synth(chart)
    assert one(docs, "PrometheusRule")["spec"]["groups"] == [group]
    assert dashboards_config_map(docs)["data"] == {"a.json": "{}"}


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [OLDEST_K8S_VERSION, NEWEST_K8S_VERSION])
def test_core_objects_pass_strict_kubernetes_validation(docs, version: str) -> None:
    core = [doc for doc in docs if doc["kind"] not in CRD_KINDS]
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def unknown_fields(annotation: Any, value: Any, path: str = "") -> list[str]:
    """Keys of ``value`` that the pydantic model(s) in ``annotation`` do not declare, recursively.

    The prometheus-operator models accept and drop unknown keys, so a misspelt field would pass them.
    """
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return min((unknown_fields(arg, value, path) for arg in args if arg is not type(None)), key=len)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
        fields = {field.alias or name: field.annotation for name, field in annotation.model_fields.items()}
        return [
            problem
            for key, item in value.items()
            for problem in (
                unknown_fields(fields[key], item, f"{path}{key}.") if key in fields else [f"{path}{key}"]
            )
        ]
    if origin is list and isinstance(value, list):
        return [
            problem
            for i, item in enumerate(value)
            for problem in unknown_fields(args[0], item, f"{path}{i}.")
        ]
    if origin is dict and isinstance(value, dict):
        return [
            problem
            for key, item in value.items()
            for problem in unknown_fields(args[1], item, f"{path}{key}.")
        ]
    return []


def check_custom_resource(doc: dict[str, Any]) -> None:
    model = getattr(prometheus_operator, doc["kind"])
    model.model_validate(doc)
    assert unknown_fields(model, doc) == []


def test_custom_resources_match_the_prometheus_operator_models(docs) -> None:
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            check_custom_resource(doc)


@pytest.mark.parametrize(
    ("kind", "misspell"),
    [
        ("ServiceMonitor", lambda spec: spec["endpoints"][0].__setitem__("scrape_interval", "15s")),
        ("PrometheusRule", lambda spec: spec["groups"][0]["rules"][0].__setitem__("fro", "5m")),
    ],
)
def test_a_misspelt_field_fails(default_docs, kind: str, misspell) -> None:
    doc = json.loads(json.dumps(one(default_docs, kind)))
    misspell(doc["spec"])
    with pytest.raises(AssertionError, match=r"scrape_interval|fro"):
        check_custom_resource(doc)


def test_checkov_passes(default_dir: Path, full_dir: Path, default_docs, full_docs) -> None:
    checkov = Path(sys.executable).with_name("checkov")
    result = subprocess.run(
        [str(checkov), "--config-file", str(Path(__file__).with_name("checkov-k8s.yaml")),
         "-d", str(default_dir), "-d", str(full_dir), "--skip-download", "--quiet", "--compact"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
