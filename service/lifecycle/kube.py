"""The Kubernetes API calls of cluster mode, made with ``kubernetes_asyncio`` (no hand-written HTTP).

Exactly these calls, which the Role of the ``ModelServer`` construct allows and the API double of
the tests (``tests/kube_api_double.py``) implements:

- configmaps, by the name of the desired-state ConfigMap: list (field selector ``metadata.name``),
  watch (from a ``resourceVersion``, with bookmarks), get, and a strategic merge patch whose
  ``metadata.resourceVersion`` makes it conditional (a stale write is a ``409 Conflict``);
- pods: list by the release's label selector, and a strategic merge patch of this replica's own
  Pod annotation.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from service.settings import Settings

#: The annotation on each replica's Pod holding its state (JSON, see ``fleet.ReplicaState``).
REPLICA_STATE_ANNOTATION = "model-serving.dev/replica-state"
#: Seconds the API server keeps one watch open; the stream then ends and is resumed from its last
#: resourceVersion (bookmarks keep that recent even when the ConfigMap does not change).
WATCH_TIMEOUT_S = 60
#: Seconds one request may take: an unreachable API server must not hold up /status or a rollback.
REQUEST_TIMEOUT_S = 5

#: What a call raises when the API server cannot be reached (as opposed to an ``ApiException`` answer).
TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)

__all__ = ["REPLICA_STATE_ANNOTATION", "TRANSPORT_ERRORS", "ApiException", "KubeApi"]


class KubeApi:
    """Typed access to the desired-state ConfigMap and the release's pods in one namespace."""

    def __init__(self, api_client: client.ApiClient, settings: Settings) -> None:
        self._client = api_client
        self._core = client.CoreV1Api(api_client)
        self._namespace = settings.cluster_namespace
        self._configmap = settings.cluster_configmap
        self._selector = settings.cluster_pod_selector
        self._pod = settings.pod_name

    @classmethod
    async def connect(cls, settings: Settings) -> KubeApi:
        """Credentials from ``$KUBECONFIG`` when set, else the in-cluster ServiceAccount token
        (re-read as the projected token rotates). Raises ``ConfigException`` without either."""
        configuration = client.Configuration()
        kubeconfig = os.environ.get("KUBECONFIG")
        if kubeconfig:
            await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
        return cls(client.ApiClient(configuration), settings)

    async def close(self) -> None:
        await self._client.close()

    async def list_desired(self) -> tuple[dict[str, str] | None, str]:
        """The ConfigMap's data (None when it does not exist) and the list's resourceVersion."""
        result = await self._core.list_namespaced_config_map(
            self._namespace,
            field_selector=f"metadata.name={self._configmap}",
            _request_timeout=REQUEST_TIMEOUT_S,
        )
        data = (result.items[0].data or {}) if result.items else None
        return data, result.metadata.resource_version

    async def watch_desired(self, resource_version: str) -> AsyncIterator[tuple[str, dict[str, str], str]]:
        """``(event type, data, resourceVersion)`` for each change after ``resource_version``,
        bookmarks included (empty data); ends when the API server closes the watch.
        Raises ``ApiException`` 410 when ``resource_version`` is too old (the caller re-lists)."""
        stream = watch.Watch()
        async with stream:
            async for event in stream.stream(
                self._core.list_namespaced_config_map,
                self._namespace,
                field_selector=f"metadata.name={self._configmap}",
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_TIMEOUT_S,
                _request_timeout=WATCH_TIMEOUT_S + REQUEST_TIMEOUT_S,
            ):
                raw: dict[str, Any] = event["raw_object"]
                yield event["type"], raw.get("data") or {}, raw["metadata"]["resourceVersion"]

    async def read_desired(self) -> tuple[dict[str, str], str]:
        """The ConfigMap's data and resourceVersion (for a conditional patch)."""
        cm = await self._core.read_namespaced_config_map(
            self._configmap, self._namespace, _request_timeout=REQUEST_TIMEOUT_S
        )
        return cm.data or {}, cm.metadata.resource_version

    async def patch_desired(self, data: dict[str, str], resource_version: str) -> None:
        """Write ``data`` if the ConfigMap is still at ``resource_version``, else ``ApiException`` 409."""
        body = {"metadata": {"resourceVersion": resource_version}, "data": data}
        await self._core.patch_namespaced_config_map(
            self._configmap, self._namespace, body, _request_timeout=REQUEST_TIMEOUT_S
        )

    async def list_replica_states(self) -> list[tuple[str, str | None]]:
        """``(pod name, replica-state annotation or None)`` of the release's pods that are not terminating."""
        pods = await self._core.list_namespaced_pod(
            self._namespace, label_selector=self._selector, _request_timeout=REQUEST_TIMEOUT_S
        )
        return [
            (p.metadata.name, (p.metadata.annotations or {}).get(REPLICA_STATE_ANNOTATION))
            for p in pods.items
            if p.metadata.deletion_timestamp is None
        ]

    async def publish_replica_state(self, state_json: str) -> None:
        """Set this replica's state annotation on its own Pod."""
        body = {"metadata": {"annotations": {REPLICA_STATE_ANNOTATION: state_json}}}
        await self._core.patch_namespaced_pod(
            self._pod, self._namespace, body, _request_timeout=REQUEST_TIMEOUT_S
        )
