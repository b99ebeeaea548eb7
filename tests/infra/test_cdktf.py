"""The CDK Terrain stack (cdktf/): synthesized in-process and through `python main.py`, no cluster.

Providers cannot be downloaded here, so `terraform validate` cannot run: these tests assert on the
synthesized JSON, and checkov scans it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

# Aliased so that pytest does not try to collect a class named Test*.
from cdktn import Testing as CdktnTesting

from infra_constructs import conventions

REPO_ROOT = Path(__file__).resolve().parents[2]
CDKTF_DIR = REPO_ROOT / "cdktf"
# cdktf/ is an app folder, not a package (a package named cdktf would shadow the library); synth.py
# is a script at the top.
sys.path[:0] = [str(CDKTF_DIR), str(REPO_ROOT)]

from cluster_stack import (  # noqa: E402
    KUBE_PROMETHEUS_STACK_VERSION,
    PROMETHEUS_COMMUNITY_REPO,
    STACK_ID,
    ClusterFoundationProps,
    ClusterStack,
    kube_prometheus_stack_values,
)

import synth  # noqa: E402

# The reference budget (seed README) is one node with 6 CPU / 12 GiB; the stack must also fit the
# smaller `minikube start --cpus 4 --memory 8g` next to the model server (at its rollout peak),
# leaving ~1 CPU / 1 GiB (CPU cores, MiB) for the control plane and system pods.
MINIKUBE_NODE = (4.0, 8 * 1024)
SYSTEM_HEADROOM = (1.0, 1024)


@pytest.fixture(scope="module")
def synthesized() -> str:
    return CdktnTesting.synth(ClusterStack(CdktnTesting.app(), STACK_ID))


@pytest.fixture(scope="module")
def config(synthesized: str) -> dict[str, Any]:
    return json.loads(synthesized)


@pytest.fixture(scope="module")
def release(config: dict[str, Any]) -> dict[str, Any]:
    (release,) = config["resource"]["helm_release"].values()
    return release


@pytest.fixture(scope="module")
def values(release: dict[str, Any]) -> dict[str, Any]:
    (values,) = release["values"]
    return json.loads(values)


@pytest.fixture(scope="module")
def cli_outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `cd cdktf && python main.py` writes (into a temp dir through CDKTF_OUTDIR, as the CLI does)."""
    outdir = tmp_path_factory.mktemp("cdktf.out")
    subprocess.run(
        [sys.executable, "main.py"],
        cwd=CDKTF_DIR,
        env={**os.environ, "CDKTF_OUTDIR": str(outdir)},
        check=True,
        timeout=120,
    )
    return outdir


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict[str, Any]]:
    """What `python synth.py` writes with its defaults (the cdk8s side of the contract)."""
    app = synth.build(synth.parse_args([]))
    return [doc for doc in yaml.safe_load_all(app.synth_yaml()) if doc]


def _k8s_object(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (match,) = (obj for obj in objects if obj["kind"] == kind)
    return match


def _namespace(config: dict[str, Any], name: str) -> dict[str, Any]:
    metadata = [ns["metadata"][0] for ns in config["resource"]["kubernetes_namespace_v1"].values()]
    (match,) = (m for m in metadata if m["name"] == name)
    return match


def test_namespaces_come_from_conventions(config: dict[str, Any]) -> None:
    for name in (conventions.APP_NAMESPACE, conventions.MONITORING_NAMESPACE):
        labels = _namespace(config, name)["labels"]
        assert labels[conventions.PART_OF_LABEL[0]] == conventions.PART_OF_LABEL[1]
    assert len(config["resource"]["kubernetes_namespace_v1"]) == 2


def test_app_namespace_is_the_one_synth_py_deploys_into(
    config: dict[str, Any], k8s_objects: list[dict[str, Any]]
) -> None:
    app_namespace = config["output"]["app_namespace"]["value"]
    assert app_namespace == conventions.APP_NAMESPACE
    assert _namespace(config, app_namespace)
    workload = {obj["metadata"]["namespace"] for obj in k8s_objects if obj["kind"] != "ConfigMap"}
    assert workload == {app_namespace}
    # Every namespace synth.py writes into is one this stack creates.
    created = {ns["metadata"][0]["name"] for ns in config["resource"]["kubernetes_namespace_v1"].values()}
    assert {obj["metadata"]["namespace"] for obj in k8s_objects} <= created


def test_helm_release_is_pinned_and_ci_friendly(synthesized: str, release: dict[str, Any]) -> None:
    assert CdktnTesting.to_have_resource_with_properties(
        synthesized,
        "helm_release",
        {
            "name": conventions.PROMETHEUS_STACK_RELEASE,
            "chart": "kube-prometheus-stack",
            "repository": PROMETHEUS_COMMUNITY_REPO,
            "version": KUBE_PROMETHEUS_STACK_VERSION,
            "namespace": conventions.MONITORING_NAMESPACE,
            "atomic": True,
            "wait": True,
            "create_namespace": False,
        },
    )
    assert KUBE_PROMETHEUS_STACK_VERSION.count(".") == 2  # an exact version, not a range
    assert 300 <= release["timeout"] <= 1800
    # The namespace must exist before Helm installs into it.
    assert any("monitoring-namespace" in dep for dep in release["depends_on"])


def test_values_are_code_not_a_yaml_blob(values: dict[str, Any]) -> None:
    assert values == kube_prometheus_stack_values(ClusterFoundationProps())


def _effective_selector(spec: dict[str, Any], kind: str, release: str) -> dict[str, str]:
    """matchLabels Prometheus ends up with, as the chart's prometheus.yaml template renders them."""
    if explicit := spec.get(f"{kind}Selector"):
        return explicit.get("matchLabels", {})
    if spec.get(f"{kind}SelectorNilUsesHelmValues", True):
        return {"release": release}
    return {}  # selects every object


@pytest.mark.parametrize(
    ("kind", "selector_kind"), [("ServiceMonitor", "serviceMonitor"), ("PrometheusRule", "rule")]
)
@pytest.mark.parametrize("install", ["ours", "stock chart values"])
def test_our_monitoring_labels_satisfy_the_release_selector(
    values: dict[str, Any], k8s_objects: list[dict[str, Any]], kind: str, selector_kind: str, install: str
) -> None:
    spec = values["prometheus"]["prometheusSpec"] if install == "ours" else {}
    selector = _effective_selector(spec, selector_kind, conventions.PROMETHEUS_STACK_RELEASE)
    assert selector.items() <= conventions.PROMETHEUS_SELECTOR_LABELS.items()
    assert selector.items() <= _k8s_object(k8s_objects, kind)["metadata"]["labels"].items()
    # No namespace selector: our objects live in the app namespace, not in the monitoring one.
    assert f"{selector_kind}NamespaceSelector" not in spec


def test_grafana_sidecar_discovers_our_dashboards_everywhere(
    values: dict[str, Any], k8s_objects: list[dict[str, Any]]
) -> None:
    dashboards = values["grafana"]["sidecar"]["dashboards"]
    label, label_value = conventions.GRAFANA_DASHBOARD_LABEL
    assert dashboards["enabled"] is True
    assert (dashboards["label"], dashboards["labelValue"]) == (label, label_value)
    # The dashboards' ConfigMap is the one the sidecar's label picks (the desired-model one has none).
    (config_map,) = (
        obj["metadata"]
        for obj in k8s_objects
        if obj["kind"] == "ConfigMap" and obj["metadata"]["labels"].get(label) == label_value
    )
    assert conventions.GRAFANA_FOLDER_ANNOTATION in config_map["annotations"]
    assert dashboards["searchNamespace"] == "ALL"
    assert dashboards["folderAnnotation"] == conventions.GRAFANA_FOLDER_ANNOTATION
    assert dashboards["provider"]["foldersFromFilesStructure"] is True


def _quantity(value: str) -> float:
    """CPU in cores or memory in MiB, for the suffixes the values use."""
    for suffix, scale in (("m", 1e-3), ("Mi", 1.0), ("Gi", 1024.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * scale
    return float(value)


# Values whose resources apply to several containers: Grafana's dashboard and datasource sidecars.
CONTAINERS_PER_RESOURCES = {("grafana", "sidecar", "resources"): 2}


def _requests(node: Any, path: tuple[str, ...] = ()) -> Iterator[dict[str, str]]:
    if isinstance(node, dict):
        if "requests" in node:
            yield from [node["requests"]] * CONTAINERS_PER_RESOURCES.get(path, 1)
        for key, child in node.items():
            yield from _requests(child, (*path, key))


def test_requests_fit_the_single_node_budget(
    values: dict[str, Any], k8s_objects: list[dict[str, Any]]
) -> None:
    requests = list(_requests(values))
    # prometheus, alertmanager, operator, kube-state-metrics, node-exporter, grafana + 2 sidecars
    assert len(requests) == 8
    cpu = sum(_quantity(r["cpu"]) for r in requests)
    memory = sum(_quantity(r["memory"]) for r in requests)
    # The model server at its peak: a model swap rolls out maxSurge extra pods next to the old ones.
    deployment = _k8s_object(k8s_objects, "Deployment")["spec"]
    pods = deployment["replicas"] + deployment["strategy"]["rollingUpdate"]["maxSurge"]
    server = [c["resources"]["requests"] for c in deployment["template"]["spec"]["containers"]] * pods
    free_cpu = MINIKUBE_NODE[0] - SYSTEM_HEADROOM[0] - sum(_quantity(r["cpu"]) for r in server)
    free_memory = MINIKUBE_NODE[1] - SYSTEM_HEADROOM[1] - sum(_quantity(r["memory"]) for r in server)
    assert cpu <= free_cpu, f"{cpu} CPU requested, {free_cpu} left"
    assert memory <= free_memory, f"{memory} MiB requested, {free_memory} left"


def test_providers_take_the_kubeconfig_from_variables(synthesized: str, config: dict[str, Any]) -> None:
    access = {"config_path": "${var.kubeconfig_path}", "config_context": "${var.kube_context}"}
    assert CdktnTesting.to_have_provider_with_properties(synthesized, "kubernetes", access)
    assert CdktnTesting.to_have_provider_with_properties(synthesized, "helm", {"kubernetes": access})
    assert config["variable"]["kubeconfig_path"]["default"] == "~/.kube/config"
    assert config["variable"]["kube_context"]["default"] == ""  # the file's current context


def test_outputs_say_how_to_reach_grafana(config: dict[str, Any]) -> None:
    outputs = {name: output["value"] for name, output in config["output"].items()}
    assert outputs["monitoring_namespace"] == conventions.MONITORING_NAMESPACE
    assert outputs["release_name"] == conventions.PROMETHEUS_STACK_RELEASE
    assert outputs["grafana_port_forward"].startswith(
        f"kubectl -n {conventions.MONITORING_NAMESPACE} port-forward "
        f"svc/{conventions.PROMETHEUS_STACK_RELEASE}-grafana 3000:80"
    )


def test_main_py_synthesizes_without_build_machine_paths(cli_outdir: Path) -> None:
    text = (cli_outdir / "stacks" / STACK_ID / "cdk.tf.json").read_text()
    for machine_path in (str(CDKTF_DIR.parent), str(cli_outdir), str(Path.home())):
        assert machine_path not in text
    backend_path = json.loads(text)["terraform"]["backend"]["local"]["path"]
    assert not Path(backend_path).is_absolute()
    # From the stack's working directory the state lands in cdktf/, where `cdktn deploy` keeps it.
    stack_dir = CDKTF_DIR / "cdktf.out" / "stacks" / STACK_ID
    assert (stack_dir / backend_path).resolve() == CDKTF_DIR / f"terraform.{STACK_ID}.tfstate"


def test_checkov_passes_on_the_synthesized_json(cli_outdir: Path, tmp_path: Path) -> None:
    (tmp_path / "cdk.tf.json").write_text((cli_outdir / "stacks" / STACK_ID / "cdk.tf.json").read_text())
    # checkov has no policies for namespaces or helm_release; a known-bad pod proves the scan runs.
    canary = {"metadata": [{"name": "canary"}], "spec": [{"container": [{"name": "c", "image": "busybox"}]}]}
    (tmp_path / "canary.tf.json").write_text(json.dumps({"resource": {"kubernetes_pod_v1": {"c": canary}}}))
    command = ["-d", str(tmp_path), "--framework", "terraform_json", "--skip-download", "--output", "json"]
    run = subprocess.run(
        [sys.executable, "-m", "checkov.main", *command],
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},  # no network: skip the guideline download
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(run.stdout)
    assert report["summary"]["parsing_errors"] == 0
    failed = {(check["file_path"], check["check_id"]) for check in report["results"]["failed_checks"]}
    assert {path for path, _ in failed} == {"/canary.tf.json"}, failed
