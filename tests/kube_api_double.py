"""A Kubernetes API server double for the cluster-mode tests: an aiohttp server on loopback.

What it covers: exactly the calls ``service/lifecycle/kube.py`` makes, with the API server's
semantics for them, reached by the real ``kubernetes_asyncio`` client through a kubeconfig file
(bearer token; a wrong one is a 401):

- ``GET /api/v1/namespaces/{ns}/configmaps`` and ``.../pods``: lists with a ``resourceVersion``
  (one global counter, as etcd's revision), ``labelSelector`` (``k=v``, ``k!=v``, ``k``, ``!k``,
  comma-joined) and ``fieldSelector`` (``metadata.name``/``metadata.namespace``; any other field
  is a 400, as for configmaps upstream);
- the same with ``watch=true``: newline-delimited events after ``resourceVersion``, ``BOOKMARK``
  events when ``allowWatchBookmarks`` is set, the stream closed after ``timeoutSeconds``, and an
  ``ERROR`` event with a ``410`` Status (reason ``Expired``) for a resourceVersion older than the
  compacted history;
- ``GET .../configmaps/{name}``; ``PATCH .../configmaps/{name}`` and ``.../pods/{name}`` with
  ``application/strategic-merge-patch+json`` or ``application/merge-patch+json`` (for the string
  maps we patch, ``data`` and ``metadata.annotations``, both merge key by key; other media types
  are a 415), where a ``metadata.resourceVersion`` in the patch is a precondition: a stale one is
  a ``409 Conflict`` Status, as upstream; 404 Status for a missing object.

Test hooks (not API calls): :meth:`KubeApiDouble.stop` / :meth:`start` (the server unreachable,
then back on the same port with the same objects), :meth:`expire_watches` (compacts the history
and ends every open watch, so the clients' next watch gets ``410 Gone``), and counters of the
requests seen.

What only a real cluster proves (the kind job of the CI workflow): the Role and RoleBinding of the
constructs grant exactly these verbs; the projected ServiceAccount token and its rotation; the
real strategic-merge-patch engine, admission, and the API server's timing of bookmarks and
compaction; the downward API filling ``SERVING_POD_NAME``/``SERVING_CLUSTER_NAMESPACE``; Pods that
really come and go (a deleted Pod's replacement, terminating Pods leaving the list).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
import uuid
from collections import Counter
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

PATCH_TYPES = ("application/strategic-merge-patch+json", "application/merge-patch+json")
BOOKMARK_INTERVAL_S = 1.0
KINDS = {"configmaps": "ConfigMap", "pods": "Pod"}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _fail(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(_status(code, reason, message), status=code)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch (null deletes a key)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _label_matcher(selector: str) -> Any:
    terms = [t.strip() for t in selector.split(",") if t.strip()]

    def matches(labels: dict[str, str]) -> bool:
        for term in terms:
            if "!=" in term:
                key, value = term.split("!=", 1)
                if labels.get(key.strip()) == value.strip():
                    return False
            elif "=" in term:
                key, value = term.replace("==", "=").split("=", 1)
                if labels.get(key.strip()) != value.strip():
                    return False
            elif term.startswith("!"):
                if term[1:] in labels:
                    return False
            elif term not in labels:
                return False
        return True

    return matches


def _field_matcher(selector: str) -> Any:
    wanted: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if key not in ("metadata.name", "metadata.namespace"):
            raise web.HTTPBadRequest(
                text=json.dumps(_status(400, "BadRequest", f'field label not supported: "{key}"')),
                content_type="application/json",
            )
        wanted[key.split(".")[1]] = value

    return lambda meta: all(meta.get(k) == v for k, v in wanted.items())


class KubeApiDouble:
    """The API double, serving from its own thread and event loop (the servers under test are
    separate processes). Objects live in ``objects[(plural, namespace, name)]``."""

    def __init__(self, token: str = "test-token") -> None:
        self.token = token
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.resource_version = 0
        self.compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, plural, type, object)
        self.requests: Counter[str] = Counter()  # "list configmaps", "watch configmaps", "410", ...
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-api-double", daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Condition | None = None
        self._closing: asyncio.Event | None = None

    # --- test hooks (called from the test's thread) ---
    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        """Close the listener and every connection: the API server is unreachable until start()."""
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def expire_watches(self) -> None:
        """Compact the history past every client's last resourceVersion and end all watches."""
        self._call(self._expire())

    def put(self, plural: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (what ``kubectl apply`` does to it)."""
        return self._call(self._put(plural, namespace, name, body))

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        return self._call(self._get_copy(plural, namespace, name))

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "double", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
                    "users": [{"name": "replica", "user": {"token": self.token}}],
                    "contexts": [{"name": "double", "context": {"cluster": "double", "user": "replica"}}],
                    "current-context": "double",
                }
            )
        )
        return path

    # --- the server ---
    async def _start(self) -> None:
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/api/v1/namespaces/{namespace}/{plural}", self._list)
        app.router.add_get("/api/v1/namespaces/{namespace}/{plural}/{name}", self._read)
        app.router.add_patch("/api/v1/namespaces/{namespace}/{plural}/{name}", self._patch)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is None:
            return
        assert self._closing is not None
        self._closing.set()
        await self._notify()
        await self._runner.cleanup()
        self._runner = None

    async def _expire(self) -> None:
        self.resource_version += 1  # a change to an object no client watches
        self.compacted = self.resource_version
        assert self._closing is not None
        self._closing.set()
        await self._notify()
        await asyncio.sleep(0.2)  # the watch handlers end their streams
        self._closing = asyncio.Event()

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _get_copy(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.objects[(plural, namespace, name)])

    async def _put(self, plural: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        key = (plural, namespace, name)
        existing = self.objects.get(key)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        meta.update(name=name, namespace=namespace)
        meta.setdefault("uid", existing["metadata"]["uid"] if existing else str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", KINDS[plural])
        return await self._store(key, obj, "MODIFIED" if existing else "ADDED")

    async def _store(self, key: tuple[str, str, str], obj: dict[str, Any], event: str) -> dict[str, Any]:
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        self.objects[key] = obj
        self.events.append((self.resource_version, key[0], event, copy.deepcopy(obj)))
        await self._notify()
        return copy.deepcopy(obj)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _fail(401, "Unauthorized", "Unauthorized")
        if request.match_info.get("plural") not in KINDS:
            return _fail(404, "NotFound", "the server could not find the requested resource")
        return await handler(request)

    def _selected(self, request: web.Request) -> Any:
        namespace, plural = request.match_info["namespace"], request.match_info["plural"]
        labels = _label_matcher(request.query.get("labelSelector", ""))
        fields = _field_matcher(request.query.get("fieldSelector", ""))

        def matches(p: str, obj: dict[str, Any]) -> bool:
            meta = obj["metadata"]
            return (
                p == plural
                and meta["namespace"] == namespace
                and fields(meta)
                and labels(meta.get("labels") or {})
            )

        return plural, matches

    async def _list(self, request: web.Request) -> web.StreamResponse:
        plural, matches = self._selected(request)
        if request.query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, plural, matches)
        self.requests[f"list {plural}"] += 1
        items = [copy.deepcopy(o) for (p, _, _), o in sorted(self.objects.items()) if matches(p, o)]
        return web.json_response(
            {
                "kind": KINDS[plural] + "List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.resource_version)},
                "items": items,
            }
        )

    async def _watch(self, request: web.Request, plural: str, matches: Any) -> web.StreamResponse:
        self.requests[f"watch {plural}"] += 1
        since = int(request.query.get("resourceVersion") or self.resource_version)
        bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        deadline = asyncio.get_running_loop().time() + float(request.query.get("timeoutSeconds") or 1800)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        if since < self.compacted:
            self.requests["410"] += 1
            message = f"too old resource version: {since} ({self.compacted})"
            await send({"type": "ERROR", "object": _status(410, "Expired", message)})
            return response
        assert self._changed is not None and self._closing is not None
        closing, cursor = self._closing, since
        with contextlib.suppress(ConnectionResetError):  # the client went away (a replica stopping)
            while not closing.is_set():
                for rv, p, kind, obj in [e for e in self.events if e[0] > cursor]:
                    cursor = rv
                    if matches(p, obj):
                        await send({"type": kind, "object": obj})
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                async with self._changed:
                    try:
                        await asyncio.wait_for(self._changed.wait(), min(remaining, BOOKMARK_INTERVAL_S))
                        continue
                    except TimeoutError:
                        pass
                # A bookmark only when every event up to now has been sent (one may have come while
                # this handler was writing, before it waited).
                if bookmarks and not closing.is_set() and all(e[0] <= cursor for e in self.events[-1:]):
                    cursor = self.resource_version
                    meta = {"resourceVersion": str(cursor)}
                    await send(
                        {
                            "type": "BOOKMARK",
                            "object": {"kind": KINDS[plural], "apiVersion": "v1", "metadata": meta},
                        }
                    )
        return response

    async def _read(self, request: web.Request) -> web.Response:
        plural, namespace, name = (request.match_info[k] for k in ("plural", "namespace", "name"))
        self.requests[f"get {plural}"] += 1
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            return _fail(404, "NotFound", f'{plural} "{name}" not found')
        return web.json_response(obj)

    async def _patch(self, request: web.Request) -> web.Response:
        plural, namespace, name = (request.match_info[k] for k in ("plural", "namespace", "name"))
        if request.content_type not in PATCH_TYPES:
            return _fail(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format: {request.content_type}",
            )
        self.requests[f"patch {plural}"] += 1
        key = (plural, namespace, name)
        obj = self.objects.get(key)
        if obj is None:
            return _fail(404, "NotFound", f'{plural} "{name}" not found')
        patch = await request.json()
        precondition = (patch.get("metadata") or {}).pop("resourceVersion", None)
        if precondition is not None and precondition != obj["metadata"]["resourceVersion"]:
            self.requests[f"conflict {plural}"] += 1
            return _fail(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )
        return web.json_response(await self._store(key, _merge(copy.deepcopy(obj), patch), "MODIFIED"))
