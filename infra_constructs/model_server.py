"""``ModelServer``: the model server's workload (Deployment, ServiceAccount, Service and their guards),
and in cluster mode the fleet's desired-state ConfigMap with the least RBAC its replicas need."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cdk8s import Chart
from constructs import Construct

from infra_constructs._k8s import k8s
from infra_constructs.conventions import MONITORING_NAMESPACE, PART_OF_LABEL
from service.api.paths import HEALTHZ, HTTP_PORT_NAME, METRICS, READYZ
from service.settings import BUNDLED_MODEL_ALIAS, DEFAULT_PORT, ENV_PREFIX, Settings

#: Image ``synth.py`` deploys by default: the one the README builds and loads into minikube.
DEFAULT_IMAGE = "model-serving:0.1.0"
#: Label every instance shares; the ServiceMonitor makes its value the scrape job.
APP_NAME_LABEL = "app.kubernetes.io/name"
APP_NAME = "model-server"
#: The image's non-root user and group (its Dockerfile creates them with these numeric ids).
IMAGE_UID = 10001

# Writable paths of a read-only root filesystem. The home (and workdir) of the image's user holds the
# deployment state; hub downloads get a volume of their own so that it can be a PVC. The bundled model
# stays where the image converted it (SERVING_CACHE_DIR of the image), read-only.
_HOME_DIR = "/var/lib/model-serving"
_STATE_DIR = f"{_HOME_DIR}/state"
_HF_HOME = f"{_HOME_DIR}/huggingface"

#: Keys of the desired-state ConfigMap, as the server's reconciler reads and writes them. Only the model
#: is synthesized; the others start empty and belong to the rollouts (``POST /model``, fleet rollback).
DESIRED_STATE_KEYS = (
    "model_id",
    "revision",
    "previous_model_id",
    "previous_revision",
    "rollout_id",
    "rollout_outcome",
    "rollout_reason",
    "rollout_failed_replica",
    "updated_at",
)
#: Where Kubernetes clients look for the in-cluster credentials (token, ca.crt, namespace).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Lifetime of the projected token; the kubelet renews it at 80 % and the client re-reads the file.
TOKEN_EXPIRATION_S = 3600
#: The ConfigMap holding the cluster's CA that every namespace gets (Kubernetes 1.21+).
_ROOT_CA_CONFIGMAP = "kube-root-ca.crt"


@dataclass(frozen=True)
class Resources:
    """CPU and memory of the server container (Kubernetes quantities).

    Defaults follow the reference's single-node budget: limits ``6`` CPU / ``12Gi``, requests ``1`` CPU /
    ``2Gi`` (enough for the bundled 135M model; raise the requests for bigger models).
    """

    cpu_request: str = "1"
    memory_request: str = "2Gi"
    cpu_limit: str = "6"
    memory_limit: str = "12Gi"


@dataclass(frozen=True)
class Autoscaling:
    """A HorizontalPodAutoscaler (autoscaling/v2) on average CPU utilisation.

    Defaults: ``min_replicas=1``, ``max_replicas=4``, ``target_cpu_utilization=70`` (percent of the CPU
    request), ``scale_down_stabilization_s=300`` (a model takes a while to load: scale down slowly).
    """

    min_replicas: int = 1
    max_replicas: int = 4
    target_cpu_utilization: int = 70
    scale_down_stabilization_s: int = 300

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("autoscaling needs 1 <= min_replicas <= max_replicas")


@dataclass(frozen=True)
class NetworkPolicyOptions:
    """An ingress NetworkPolicy: only the listed sources may reach the server's ``http`` port.

    Defaults: ``allow_namespaces=(MONITORING_NAMESPACE,)`` (Prometheus scrapes ``/metrics``),
    ``allow_same_namespace=True`` (clients in the server's namespace). Egress stays open: the server
    downloads models from the hub and, in cluster mode, watches the Kubernetes API server (443/6443).
    """

    allow_namespaces: Sequence[str] = (MONITORING_NAMESPACE,)
    allow_same_namespace: bool = True


@dataclass(frozen=True)
class SecretKeyRef:
    """A key of an existing Secret; the admin token is read from one, never inlined.

    Defaults: ``key="token"``, ``optional=False`` (the pod does not start until the Secret exists;
    ``optional=True`` lets it start with admin endpoints unauthenticated when the Secret is missing).
    """

    name: str
    key: str = "token"
    optional: bool = False


@dataclass(frozen=True)
class ModelCache:
    """The volume hub downloads are cached in (``HF_HOME``).

    Defaults: an ``emptyDir`` of at most ``size_limit="20Gi"``, lost with the pod. Give ``claim_name``
    (an existing PersistentVolumeClaim) to keep downloads across restarts; with more than one replica it
    must be ReadWriteMany.
    """

    size_limit: str = "20Gi"
    claim_name: str | None = None

    def volume(self, name: str) -> k8s.Volume:
        if self.claim_name:
            return k8s.Volume(
                name=name,
                persistent_volume_claim=k8s.PersistentVolumeClaimVolumeSource(claim_name=self.claim_name),
            )
        return k8s.Volume(
            name=name,
            empty_dir=k8s.EmptyDirVolumeSource(size_limit=k8s.Quantity.from_string(self.size_limit)),
        )


def env_name(setting: str) -> str:
    """The environment variable of a server setting; fails if ``Settings`` has no such field."""
    if setting not in Settings.model_fields:
        raise KeyError(f"service.settings.Settings has no field {setting!r}")
    return _env_var(setting)


def _env_var(setting: str) -> str:
    # Unchecked: the cluster-mode settings (the contract with service/settings.py) land there on another
    # branch; tests/infra checks every SERVING_* variable of the Deployment against Settings.
    return f"{ENV_PREFIX}{setting.upper()}"


class ModelServer(Construct):
    """The model server: Deployment, ServiceAccount, Service, NetworkPolicy, and when asked PDB and HPA.

    Secure by default: non-root (uid ``IMAGE_UID``), read-only root filesystem, no privilege escalation,
    every capability dropped, ``RuntimeDefault`` seccomp, no service-account token outside cluster mode.
    A rolling update with ``maxUnavailable: 0`` gated by ``/readyz`` makes every change of the pods a
    zero-downtime rollout.

    Cluster mode (the default) makes the replicas one fleet: a ConfigMap ``<name>-desired-model`` holds
    the model every replica converges on in place (``POST /model`` on any replica writes it; so does
    ``kubectl apply`` of this construct's output: the last writer wins); the pods carry no model of
    their own, so changing ``model_id`` restarts none of them. The pods then get a projected
    ServiceAccount token (``TOKEN_EXPIRATION_S``) and a Role allowing only what a replica does: read,
    watch and patch that one ConfigMap, read the pods and patch a pod (its own state annotation).

    Args:
        scope: parent construct (a ``cdk8s.Chart``; its namespace is the objects' namespace).
        id: construct id; also the default object name.
        name: name of every object and the ``app.kubernetes.io/instance`` label. Default: ``id``.
        model_id: model to serve (hub id ``org/name``, path, or the bundled alias): in cluster mode the
            desired model the ConfigMap is synthesized with, else ``SERVING_MODEL`` of the pods.
            Default: ``BUNDLED_MODEL_ALIAS`` (shipped in the image, no download).
        revision: hub revision of ``model_id``. Default: ``None`` (the hub's default branch).
        cluster_mode: the desired-state ConfigMap, its Role and RoleBinding, the projected token and
            the ``SERVING_CLUSTER_*`` settings. Needs the chart's namespace (the RoleBinding names the
            ServiceAccount by namespace). Default: ``True``.
        image: container image. Default: ``DEFAULT_IMAGE``.
        image_pull_policy: Default: ``"IfNotPresent"`` (what ``minikube image load`` needs).
        replicas: pod count when ``autoscaling`` is unset. Default: ``1``. More than one adds a
            PodDisruptionBudget (``maxUnavailable: 1``).
        resources: Default: ``Resources()`` (requests 1 CPU / 2Gi, limits 6 CPU / 12Gi).
        model_cache: Default: ``ModelCache()`` (a 20Gi ``emptyDir``).
        shm_size: size of the in-memory ``/dev/shm``. Default: ``"1Gi"``.
        admin_token: Secret key holding ``SERVING_ADMIN_TOKEN``. Default:
            ``SecretKeyRef(name=f"{name}-admin")`` (key ``token``, required).
        autoscaling: add a HorizontalPodAutoscaler; the Deployment then leaves ``replicas`` to it.
            Default: ``None`` (fixed ``replicas``).
        network_policy: the ingress NetworkPolicy. Default: ``NetworkPolicyOptions()`` (only the
            monitoring namespace and the server's own namespace reach the ``http`` port); ``None``
            for no policy.
        port: container and Service port. Default: ``DEFAULT_PORT`` of the server's settings (8000).
        max_running_requests: ``SERVING_MAX_RUNNING_REQUESTS``. Default: ``None`` (server default).
        max_queued_requests: ``SERVING_MAX_QUEUED_REQUESTS``. Default: ``None`` (server default).
        shutdown_grace_s: ``SERVING_SHUTDOWN_GRACE_S``, how long in-flight requests may finish after
            SIGTERM. Default: the server's default (30 s).
        pre_stop_delay_s: ``preStop`` sleep so endpoints drop the pod before SIGTERM. Default: ``5``.
        startup_timeout_s: how long the startup probe waits for ``/readyz`` (a cold download of a big
            model). Default: ``1800``.
        otlp_endpoint: OTLP/HTTP collector base URL (e.g. ``http://otel-collector.monitoring:4318``)
            to export traces to, as ``OTEL_EXPORTER_OTLP_ENDPOINT``, with ``OTEL_SERVICE_NAME`` set to
            ``name`` and probes and scrapes left untraced. Default: ``None`` (tracing off).
        env: extra environment variables (e.g. ``{"SERVING_ALLOWED_MODELS": "org/*"}``). Default: none.
        console: serve the web console at ``/`` (``SERVING_CONSOLE``). Default: ``True``.
        labels: extra labels on every object and the pods. Default: none.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        name: str | None = None,
        model_id: str = BUNDLED_MODEL_ALIAS,
        revision: str | None = None,
        cluster_mode: bool = True,
        image: str = DEFAULT_IMAGE,
        image_pull_policy: str = "IfNotPresent",
        replicas: int = 1,
        resources: Resources = Resources(),
        model_cache: ModelCache = ModelCache(),
        shm_size: str = "1Gi",
        admin_token: SecretKeyRef | None = None,
        autoscaling: Autoscaling | None = None,
        network_policy: NetworkPolicyOptions | None = NetworkPolicyOptions(),
        port: int = DEFAULT_PORT,
        max_running_requests: int | None = None,
        max_queued_requests: int | None = None,
        shutdown_grace_s: float = Settings.model_fields["shutdown_grace_s"].default,
        pre_stop_delay_s: int = 5,
        startup_timeout_s: int = 1800,
        otlp_endpoint: str | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        console: bool = True,
    ) -> None:
        super().__init__(scope, id)
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self.name = name or id
        self.port = port
        #: Labels that pick this server's pods (Deployment, Service, PDB, NetworkPolicy selectors).
        self.selector_labels = {APP_NAME_LABEL: APP_NAME, "app.kubernetes.io/instance": self.name}
        #: Labels of every object and pod.
        self.labels = {
            **self.selector_labels,
            "app.kubernetes.io/component": "server",
            PART_OF_LABEL[0]: PART_OF_LABEL[1],
            **(labels or {}),
        }
        admin_token = admin_token or SecretKeyRef(name=f"{self.name}-admin")
        #: Name of the desired-state ConfigMap (made only in cluster mode).
        self.desired_model_name = f"{self.name}-desired-model"

        # The token is never automounted: in cluster mode the pod mounts a projected, expiring one.
        self.service_account = k8s.KubeServiceAccount(
            self, "service-account", metadata=self._meta(), automount_service_account_token=False
        )
        self.desired_model: k8s.KubeConfigMap | None = None
        self.role: k8s.KubeRole | None = None
        self.role_binding: k8s.KubeRoleBinding | None = None
        if cluster_mode:
            self._fleet(model_id=model_id, revision=revision)
        container = self._container(
            image=image,
            image_pull_policy=image_pull_policy,
            resources=resources,
            env=self._env(
                model_id=model_id,
                revision=revision,
                cluster_mode=cluster_mode,
                admin_token=admin_token,
                max_running_requests=max_running_requests,
                max_queued_requests=max_queued_requests,
                shutdown_grace_s=shutdown_grace_s,
                extra={
                    env_name("console"): str(console).lower(),
                    **self._tracing_env(otlp_endpoint),
                    **(env or {}),
                },
            ),
            pre_stop_delay_s=pre_stop_delay_s,
            startup_timeout_s=startup_timeout_s,
            token_mount=cluster_mode,
        )
        volumes = [
            k8s.Volume(name="home", empty_dir=k8s.EmptyDirVolumeSource()),
            model_cache.volume("model-cache"),
            k8s.Volume(name="tmp", empty_dir=k8s.EmptyDirVolumeSource()),
            k8s.Volume(
                name="dshm",
                empty_dir=k8s.EmptyDirVolumeSource(
                    medium="Memory", size_limit=k8s.Quantity.from_string(shm_size)
                ),
            ),
        ]
        if cluster_mode:
            volumes.append(_token_volume())
        self.deployment = k8s.KubeDeployment(
            self,
            "deployment",
            metadata=self._meta(),
            spec=k8s.DeploymentSpec(
                # With an HPA the Deployment must not carry replicas, or each re-apply resets the scale.
                replicas=None if autoscaling else replicas,
                selector=k8s.LabelSelector(match_labels=self.selector_labels),
                strategy=k8s.DeploymentStrategy(
                    type="RollingUpdate",
                    rolling_update=k8s.RollingUpdateDeployment(
                        max_unavailable=k8s.IntOrString.from_number(0),
                        max_surge=k8s.IntOrString.from_number(1),
                    ),
                ),
                # The rollout may wait for a cold model download before it counts as stuck.
                progress_deadline_seconds=startup_timeout_s + 600,
                revision_history_limit=5,
                template=k8s.PodTemplateSpec(
                    metadata=k8s.ObjectMeta(labels=self.labels),
                    spec=k8s.PodSpec(
                        service_account_name=self.service_account.name,
                        automount_service_account_token=False,
                        enable_service_links=False,
                        # preStop sleep + the server's own drain + a margin before SIGKILL.
                        termination_grace_period_seconds=pre_stop_delay_s + math.ceil(shutdown_grace_s) + 10,
                        security_context=k8s.PodSecurityContext(
                            run_as_non_root=True,
                            run_as_user=IMAGE_UID,
                            run_as_group=IMAGE_UID,
                            fs_group=IMAGE_UID,
                            seccomp_profile=k8s.SeccompProfile(type="RuntimeDefault"),
                        ),
                        containers=[container],
                        volumes=volumes,
                    ),
                ),
            ),
        )
        self.service = k8s.KubeService(
            self,
            "service",
            metadata=self._meta(),
            spec=k8s.ServiceSpec(
                type="ClusterIP",
                selector=self.selector_labels,
                ports=[
                    k8s.ServicePort(
                        name=HTTP_PORT_NAME,
                        port=port,
                        target_port=k8s.IntOrString.from_string(HTTP_PORT_NAME),
                        protocol="TCP",
                    )
                ],
            ),
        )
        max_pods = autoscaling.max_replicas if autoscaling else replicas
        self.pod_disruption_budget = (
            k8s.KubePodDisruptionBudget(
                self,
                "pdb",
                metadata=self._meta(),
                spec=k8s.PodDisruptionBudgetSpec(
                    max_unavailable=k8s.IntOrString.from_number(1),
                    selector=k8s.LabelSelector(match_labels=self.selector_labels),
                ),
            )
            if max_pods > 1
            else None
        )
        self.autoscaler = self._autoscaler(autoscaling) if autoscaling else None
        self.network_policy = self._network_policy(network_policy) if network_policy else None

    def _meta(self) -> k8s.ObjectMeta:
        return k8s.ObjectMeta(name=self.name, labels=self.labels)

    def _fleet(self, *, model_id: str, revision: str | None) -> None:
        """The desired-state ConfigMap and the Role and RoleBinding the replicas need to converge on it."""
        namespace = Chart.of(self).namespace
        if not namespace:
            raise ValueError("cluster_mode needs a namespace on the chart: the RoleBinding names it")
        desired = dict.fromkeys(DESIRED_STATE_KEYS, "") | {"model_id": model_id, "revision": revision or ""}
        self.desired_model = k8s.KubeConfigMap(
            self,
            "desired-model",
            metadata=k8s.ObjectMeta(name=self.desired_model_name, labels=self.labels),
            data=desired,
        )
        self.role = k8s.KubeRole(
            self,
            "role",
            metadata=self._meta(),
            rules=[
                # resourceNames also bounds list and watch: the server lists and watches with the field
                # selector metadata.name=<that ConfigMap>, the only form RBAC allows for them.
                k8s.PolicyRule(
                    api_groups=[""],
                    resources=["configmaps"],
                    resource_names=[self.desired_model_name],
                    verbs=["get", "list", "watch", "patch"],
                ),
                # The fleet view reads the release's pods (RBAC cannot filter by label; the server does).
                k8s.PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list", "watch"]),
                # Each replica patches its own Pod's state annotation. RBAC cannot restrict a patch to the
                # caller's own pod (resourceNames are fixed at synth time; pod names are not).
                k8s.PolicyRule(api_groups=[""], resources=["pods"], verbs=["patch"]),
            ],
        )
        self.role_binding = k8s.KubeRoleBinding(
            self,
            "role-binding",
            metadata=self._meta(),
            role_ref=k8s.RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=self.name),
            subjects=[
                k8s.Subject(kind="ServiceAccount", name=self.service_account.name, namespace=namespace)
            ],
        )

    def _tracing_env(self, otlp_endpoint: str | None) -> dict[str, str]:
        if otlp_endpoint is None:
            return {}
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
            "OTEL_SERVICE_NAME": self.name,
            # Probes and scrapes every few seconds would bury the requests worth tracing.
            "OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS": ",".join(
                p.lstrip("/") for p in (HEALTHZ, READYZ, METRICS)
            ),
        }

    def _env(
        self,
        *,
        model_id: str,
        revision: str | None,
        cluster_mode: bool,
        admin_token: SecretKeyRef,
        max_running_requests: int | None,
        max_queued_requests: int | None,
        shutdown_grace_s: float,
        extra: Mapping[str, str],
    ) -> list[k8s.EnvVar]:
        values: dict[str, str | int | float | None] = {
            # In cluster mode the model lives in the ConfigMap only: changing it swaps the model in the
            # running pods (rolled back together on failure) instead of restarting them all.
            env_name("model"): None if cluster_mode else model_id,
            env_name("revision"): None if cluster_mode else revision,
            # The server listens on loopback unless told otherwise; the kubelet probes the pod IP.
            env_name("host"): "0.0.0.0",
            env_name("port"): self.port,
            env_name("state_dir"): _STATE_DIR,
            env_name("max_running_requests"): max_running_requests,
            env_name("max_queued_requests"): max_queued_requests,
            env_name("shutdown_grace_s"): shutdown_grace_s,
            "HF_HOME": _HF_HOME,
            **extra,
        }
        if cluster_mode:
            values |= {
                _env_var("cluster_mode"): "true",
                _env_var("cluster_configmap"): self.desired_model_name,
                _env_var("cluster_pod_selector"): ",".join(
                    f"{k}={v}" for k, v in self.selector_labels.items()
                ),
            }
        env = [k8s.EnvVar(name=key, value=str(value)) for key, value in values.items() if value is not None]
        if cluster_mode:
            env += [
                k8s.EnvVar(
                    name=_env_var(setting),
                    value_from=k8s.EnvVarSource(field_ref=k8s.ObjectFieldSelector(field_path=field)),
                )
                for setting, field in (
                    ("cluster_namespace", "metadata.namespace"),
                    ("pod_name", "metadata.name"),
                )
            ]
        env.append(
            k8s.EnvVar(
                name=env_name("admin_token"),
                value_from=k8s.EnvVarSource(
                    secret_key_ref=k8s.SecretKeySelector(
                        name=admin_token.name, key=admin_token.key, optional=admin_token.optional
                    )
                ),
            )
        )
        return env

    def _container(
        self,
        *,
        image: str,
        image_pull_policy: str,
        resources: Resources,
        env: list[k8s.EnvVar],
        pre_stop_delay_s: int,
        startup_timeout_s: int,
        token_mount: bool,
    ) -> k8s.Container:
        def probe(path: str, period_s: int, failures: int) -> k8s.Probe:
            return k8s.Probe(
                http_get=k8s.HttpGetAction(path=path, port=k8s.IntOrString.from_string(HTTP_PORT_NAME)),
                period_seconds=period_s,
                timeout_seconds=5,
                failure_threshold=failures,
            )

        startup_period_s = 10

        def quantity(value: str) -> k8s.Quantity:
            return k8s.Quantity.from_string(value)

        return k8s.Container(
            name="server",
            image=image,
            image_pull_policy=image_pull_policy,
            ports=[k8s.ContainerPort(name=HTTP_PORT_NAME, container_port=self.port, protocol="TCP")],
            env=env,
            resources=k8s.ResourceRequirements(
                requests={
                    "cpu": quantity(resources.cpu_request),
                    "memory": quantity(resources.memory_request),
                },
                limits={"cpu": quantity(resources.cpu_limit), "memory": quantity(resources.memory_limit)},
            ),
            # Ready means a model is loaded; until then (a cold download) only the startup probe runs.
            startup_probe=probe(READYZ, startup_period_s, math.ceil(startup_timeout_s / startup_period_s)),
            readiness_probe=probe(READYZ, 5, 3),
            liveness_probe=probe(HEALTHZ, 10, 3),
            # Keep serving while the endpoints controller takes the pod out of the Service.
            lifecycle=k8s.Lifecycle(
                pre_stop=k8s.LifecycleHandler(exec=k8s.ExecAction(command=["sleep", str(pre_stop_delay_s)]))
            ),
            security_context=k8s.SecurityContext(
                run_as_non_root=True,
                run_as_user=IMAGE_UID,
                run_as_group=IMAGE_UID,
                read_only_root_filesystem=True,
                allow_privilege_escalation=False,
                privileged=False,
                capabilities=k8s.Capabilities(drop=["ALL"]),
                seccomp_profile=k8s.SeccompProfile(type="RuntimeDefault"),
            ),
            volume_mounts=[
                k8s.VolumeMount(name="home", mount_path=_HOME_DIR),
                k8s.VolumeMount(name="model-cache", mount_path=_HF_HOME),
                k8s.VolumeMount(name="tmp", mount_path="/tmp"),
                k8s.VolumeMount(name="dshm", mount_path="/dev/shm"),
                *(
                    [k8s.VolumeMount(name=_TOKEN_VOLUME, mount_path=SERVICE_ACCOUNT_DIR, read_only=True)]
                    if token_mount
                    else []
                ),
            ],
        )

    def _autoscaler(self, autoscaling: Autoscaling) -> k8s.KubeHorizontalPodAutoscalerV2:
        return k8s.KubeHorizontalPodAutoscalerV2(
            self,
            "hpa",
            metadata=self._meta(),
            spec=k8s.HorizontalPodAutoscalerSpecV2(
                scale_target_ref=k8s.CrossVersionObjectReferenceV2(
                    api_version=k8s.KubeDeployment.GVK.api_version, kind="Deployment", name=self.name
                ),
                min_replicas=autoscaling.min_replicas,
                max_replicas=autoscaling.max_replicas,
                metrics=[
                    k8s.MetricSpecV2(
                        type="Resource",
                        resource=k8s.ResourceMetricSourceV2(
                            name="cpu",
                            target=k8s.MetricTargetV2(
                                type="Utilization", average_utilization=autoscaling.target_cpu_utilization
                            ),
                        ),
                    )
                ],
                behavior=k8s.HorizontalPodAutoscalerBehaviorV2(
                    scale_down=k8s.HpaScalingRulesV2(
                        stabilization_window_seconds=autoscaling.scale_down_stabilization_s
                    )
                ),
            ),
        )

    def _network_policy(self, options: NetworkPolicyOptions) -> k8s.KubeNetworkPolicy:
        # Namespaces are matched by the label the API server sets on each (Kubernetes 1.21+).
        sources = [
            k8s.NetworkPolicyPeer(
                namespace_selector=k8s.LabelSelector(match_labels={"kubernetes.io/metadata.name": namespace})
            )
            for namespace in options.allow_namespaces
        ]
        if options.allow_same_namespace:
            sources.append(k8s.NetworkPolicyPeer(pod_selector=k8s.LabelSelector()))
        return k8s.KubeNetworkPolicy(
            self,
            "network-policy",
            metadata=self._meta(),
            spec=k8s.NetworkPolicySpec(
                pod_selector=k8s.LabelSelector(match_labels=self.selector_labels),
                policy_types=["Ingress"],
                ingress=[
                    k8s.NetworkPolicyIngressRule(
                        from_=sources,
                        ports=[
                            k8s.NetworkPolicyPort(
                                port=k8s.IntOrString.from_string(HTTP_PORT_NAME), protocol="TCP"
                            )
                        ],
                    )
                ],
            ),
        )


_TOKEN_VOLUME = "kube-api-access"


def _token_volume() -> k8s.Volume:
    """What the kubelet would automount, made explicit and expiring: token, cluster CA, namespace."""
    return k8s.Volume(
        name=_TOKEN_VOLUME,
        projected=k8s.ProjectedVolumeSource(
            sources=[
                k8s.VolumeProjection(
                    service_account_token=k8s.ServiceAccountTokenProjection(
                        path="token", expiration_seconds=TOKEN_EXPIRATION_S
                    )
                ),
                k8s.VolumeProjection(
                    config_map=k8s.ConfigMapProjection(
                        name=_ROOT_CA_CONFIGMAP, items=[k8s.KeyToPath(key="ca.crt", path="ca.crt")]
                    )
                ),
                k8s.VolumeProjection(
                    downward_api=k8s.DownwardApiProjection(
                        items=[
                            k8s.DownwardApiVolumeFile(
                                path="namespace",
                                field_ref=k8s.ObjectFieldSelector(
                                    api_version="v1", field_path="metadata.namespace"
                                ),
                            )
                        ]
                    )
                ),
            ]
        ),
    )
