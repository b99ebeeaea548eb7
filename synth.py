"""Write the model server's Kubernetes manifests: ``python synth.py``, then ``kubectl apply -f dist/``.

Two files: ``<namespace>.k8s.yaml`` (the workload) and ``monitoring.k8s.yaml`` (ServiceMonitor,
PrometheusRule, Grafana dashboards; needs kube-prometheus-stack's CRDs, skip it with --no-monitoring).
The replicas run in cluster mode: they converge on the model in the ConfigMap <name>-desired-model,
which this writes with --model (and --revision) and which POST /model on any replica changes too; the
last writer wins, so re-applying an older manifest reverts a model deployed through the API.
--no-cluster-mode leaves each replica on its own (--model at start, POST /model per pod).
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Sequence
from pathlib import Path

# jsii runs on the machine's Node 20 and would print an end-of-life banner on every run.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import cdk8s  # jsii reads the variable above at import

from infra_constructs import (
    Autoscaling,
    ModelCache,
    ModelServer,
    ModelServerMonitoring,
    NetworkPolicyOptions,
    Resources,
    SecretKeyRef,
)
from infra_constructs.conventions import APP_NAMESPACE, MONITORING_NAMESPACE

#: File name stem of the monitoring objects (the workload's file is named after the namespace).
MONITORING_CHART = "monitoring"
#: Name of the server's objects unless --name says otherwise (also the scrape job of the alerts).
DEFAULT_NAME = "model-server"

# The constructs' own defaults, so that --help states them without retyping any.
_SERVER = {name: p.default for name, p in inspect.signature(ModelServer.__init__).parameters.items()}
_RESOURCES = Resources()
_AUTOSCALING = Autoscaling()
_CACHE = ModelCache()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python synth.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    d = " (default: %(default)s)"
    add("--out", type=Path, default=Path("dist"), help="output folder" + d)
    add("--namespace", default=APP_NAMESPACE, help="namespace of the server's objects" + d)
    add("--name", default=DEFAULT_NAME, help="name of the server's objects" + d)
    add("--image", default=_SERVER["image"], help="container image" + d)
    add("--image-pull-policy", default=_SERVER["image_pull_policy"], help="imagePullPolicy" + d)
    add("--model", default=_SERVER["model_id"], help="model served: hub id org/name or bundled alias" + d)
    add(
        "--revision", default=_SERVER["revision"], help="hub revision of --model (default: the hub's default)"
    )
    add(
        "--no-cluster-mode",
        action="store_true",
        help="independent replicas: no desired-state ConfigMap, Role, RoleBinding or API token",
    )
    add("--replicas", type=int, default=_SERVER["replicas"], help="pods (without --autoscaling)" + d)
    add("--cpu-request", default=_RESOURCES.cpu_request, help="CPU request" + d)
    add("--memory-request", default=_RESOURCES.memory_request, help="memory request" + d)
    add("--cpu-limit", default=_RESOURCES.cpu_limit, help="CPU limit" + d)
    add("--memory-limit", default=_RESOURCES.memory_limit, help="memory limit" + d)
    add("--shm-size", default=_SERVER["shm_size"], help="size of the in-memory /dev/shm" + d)
    add("--model-cache-size", default=_CACHE.size_limit, help="size limit of the emptyDir hub cache" + d)
    add("--model-cache-pvc", default=None, help="existing PVC for the hub cache instead of an emptyDir")
    add("--autoscaling", action="store_true", help="add a HorizontalPodAutoscaler (autoscaling/v2)")
    add("--min-replicas", type=int, default=_AUTOSCALING.min_replicas, help="HPA minimum" + d)
    add("--max-replicas", type=int, default=_AUTOSCALING.max_replicas, help="HPA maximum" + d)
    add("--target-cpu", type=int, default=_AUTOSCALING.target_cpu_utilization, help="HPA CPU %%" + d)
    add("--no-network-policy", action="store_true", help="leave out the ingress NetworkPolicy")
    add(
        "--allow-namespace",
        action="append",
        default=None,
        help=f"namespace allowed through the NetworkPolicy, repeatable (default: {MONITORING_NAMESPACE})",
    )
    add("--admin-secret", default=None, help="Secret holding the admin token (default: NAME-admin)")
    add("--admin-secret-key", default="token", help="key of the admin token in that Secret" + d)
    add(
        "--admin-secret-optional",
        action="store_true",
        help="start without the Secret (admin endpoints then unauthenticated)",
    )
    add(
        "--max-running-requests", type=int, default=None, help="SERVING_MAX_RUNNING_REQUESTS (server default)"
    )
    add("--max-queued-requests", type=int, default=None, help="SERVING_MAX_QUEUED_REQUESTS (server default)")
    add("--shutdown-grace-s", type=float, default=_SERVER["shutdown_grace_s"], help="drain time" + d)
    add("--no-console", action="store_true", help="turn off the web console at / (SERVING_CONSOLE=false)")
    add("--otlp-endpoint", default=None, help="OTLP/HTTP collector URL to export traces to (default: off)")
    add("--no-monitoring", action="store_true", help="skip ServiceMonitor, PrometheusRule and dashboards")
    add("--dashboards-namespace", default=MONITORING_NAMESPACE, help="namespace of the dashboards" + d)
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> cdk8s.App:
    """The cdk8s app for ``args``: one chart for the workload, one for the monitoring objects."""
    app = cdk8s.App(outdir=str(args.out), yaml_output_type=cdk8s.YamlOutputType.FILE_PER_CHART)
    chart = cdk8s.Chart(app, args.namespace, namespace=args.namespace)
    allowed = {"allow_namespaces": tuple(args.allow_namespace)} if args.allow_namespace else {}
    server = ModelServer(
        chart,
        args.name,
        model_id=args.model,
        revision=args.revision,
        cluster_mode=not args.no_cluster_mode,
        image=args.image,
        image_pull_policy=args.image_pull_policy,
        replicas=args.replicas,
        resources=Resources(
            cpu_request=args.cpu_request,
            memory_request=args.memory_request,
            cpu_limit=args.cpu_limit,
            memory_limit=args.memory_limit,
        ),
        model_cache=ModelCache(size_limit=args.model_cache_size, claim_name=args.model_cache_pvc),
        shm_size=args.shm_size,
        admin_token=SecretKeyRef(
            name=args.admin_secret or f"{args.name}-admin",
            key=args.admin_secret_key,
            optional=args.admin_secret_optional,
        ),
        autoscaling=Autoscaling(
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            target_cpu_utilization=args.target_cpu,
        )
        if args.autoscaling
        else None,
        network_policy=None if args.no_network_policy else NetworkPolicyOptions(**allowed),
        max_running_requests=args.max_running_requests,
        max_queued_requests=args.max_queued_requests,
        shutdown_grace_s=args.shutdown_grace_s,
        console=not args.no_console,
        otlp_endpoint=args.otlp_endpoint,
    )
    if not args.no_monitoring:
        monitoring = cdk8s.Chart(app, MONITORING_CHART, namespace=args.namespace)
        ModelServerMonitoring(
            monitoring, "monitoring", server=server, dashboards_namespace=args.dashboards_namespace
        )
    return app


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Synthesize into ``--out``, replacing manifests of an earlier run; return the files written."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.k8s.yaml"):  # e.g. monitoring.k8s.yaml after --no-monitoring
        stale.unlink()
    build(args).synth()
    written = sorted(args.out.glob("*.k8s.yaml"))
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
