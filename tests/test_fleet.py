"""Cluster mode with three real server processes and the Kubernetes API double.

One fleet serves the whole module (starting three servers is the slow part); each test waits for
the fleet to be converged before it acts. Every replica has its own state directory and its own
model root, as each pod has its own volumes: ``tiny-c`` exists in replica 0's root only, so it
fails on the two others.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from service.lifecycle.fleet import ROLLOUT_TIMEOUT_S, DesiredModel, ReplicaState, Rollout
from service.lifecycle.kube import REPLICA_STATE_ANNOTATION
from service.metrics import FLEET_REPLICA_CONVERGED, KUBE_API_CONNECTED
from service.settings import Settings
from tests.kube_api_double import KubeApiDouble
from tests.server_process import ServerProcess, running_server
from tests.test_server_process import Traffic

NAMESPACE = "serving"
CONFIGMAP = "chat-desired-model"
SELECTOR = "app.kubernetes.io/instance=chat"
PODS = ("chat-0", "chat-1", "chat-2")
EVERYWHERE = ("tiny-a", "tiny-b", "tiny-d")  # in every replica's model root; tiny-c in chat-0's only


class Fleet:
    """The double, and one server process per Pod (restartable)."""

    def __init__(self, double: KubeApiDouble, workdir: Path, configured: str, stack: ExitStack) -> None:
        self.double, self.workdir, self.configured, self._stack = double, workdir, configured, stack
        self.kubeconfig = double.write_kubeconfig(workdir / "kubeconfig")
        self.servers: list[ServerProcess] = []

    def env(self, index: int) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "SERVING_CLUSTER_MODE": "true",
            "SERVING_CLUSTER_CONFIGMAP": CONFIGMAP,
            "SERVING_CLUSTER_NAMESPACE": NAMESPACE,
            "SERVING_POD_NAME": PODS[index],
            "SERVING_CLUSTER_POD_SELECTOR": SELECTOR,
            "SERVING_MODEL_ROOT": str(self.workdir / f"root-{index}"),
        }

    def launch(self, index: int) -> ServerProcess:
        return self._stack.enter_context(
            running_server(
                self.workdir / PODS[index], model=self.configured, env=self.env(index), ready=False
            )
        )

    @property
    def urls(self) -> list[str]:
        return [s.base_url for s in self.servers]

    def status(self, index: int = 0) -> dict[str, Any]:
        return httpx.get(f"{self.servers[index].base_url}/status", timeout=30).json()

    def post(self, index: int, model_id: str) -> httpx.Response:
        return httpx.post(f"{self.servers[index].base_url}/model", json={"model_id": model_id}, timeout=30)

    def configmap(self) -> dict[str, str]:
        return self.double.get("configmaps", NAMESPACE, CONFIGMAP)["data"]

    def wait(self, check: Callable[[dict[str, Any]], bool], timeout_s: float = 120, index: int = 0) -> dict:
        """Poll replica ``index``'s fleet view until ``check`` holds; returns that view."""
        deadline = time.monotonic() + timeout_s
        fleet: dict[str, Any] = {}
        while time.monotonic() < deadline:
            fleet = self.status(index).get("fleet") or {}
            if fleet and check(fleet):
                return fleet
            time.sleep(0.1)
        raise TimeoutError(f"fleet never got there: {json.dumps(fleet, indent=1)}")

    def wait_converged(self, model_id: str, timeout_s: float = 120) -> dict[str, Any]:
        return self.wait(lambda f: converged(f, model_id), timeout_s)

    def settled(self) -> str:
        """The desired model, once every replica serves it (whatever the tests before did)."""
        return self.wait(lambda f: converged(f, f["desired"]["model_id"]))["desired"]["model_id"]


def another(model_id: str) -> str:
    """A model every replica can load, other than ``model_id``."""
    return next(m for m in EVERYWHERE if m != model_id)


def converged(fleet: dict[str, Any], model_id: str) -> bool:
    rollout, desired = fleet["rollout"], fleet["desired"]
    return (
        desired["model_id"] == model_id
        and rollout["ready"] == rollout["total"] == len(PODS)
        and all(r["model_id"] == model_id and r["phase"] == "ready" for r in fleet["replicas"])
    )


def apply_manifest(fleet: Fleet, model_id: str) -> None:
    """What ``kubectl apply`` of the synthesized ConfigMap does: the model set, the other keys empty."""
    fleet.double.put("configmaps", NAMESPACE, CONFIGMAP, {"data": {"model_id": model_id, "revision": ""}})


def metric(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels, "annotations": {}},
        "spec": {"containers": [{"name": "server", "image": "model-serving:test"}]},
        "status": {"phase": "Running"},
    }


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_a: Path, tiny_model_b: Path
) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    for index in range(len(PODS)):
        root = workdir / f"root-{index}"
        for name, source in zip(EVERYWHERE, (tiny_model_a, tiny_model_b, tiny_model_a), strict=True):
            shutil.copytree(source, root / name)
    shutil.copytree(tiny_model_b, workdir / "root-0" / "tiny-c")
    double = KubeApiDouble()
    double.start()
    configured = str(tiny_model_a)  # what the construct synthesizes from --model
    double.put("configmaps", NAMESPACE, CONFIGMAP, {"data": {"model_id": configured, "revision": ""}})
    for name in PODS:
        double.put("pods", NAMESPACE, name, pod(name, {"app.kubernetes.io/instance": "chat"}))
    double.put(
        "pods", NAMESPACE, "someone-else", pod("someone-else", {"app.kubernetes.io/instance": "other"})
    )
    with ExitStack() as stack:
        fleet = Fleet(double, workdir, configured, stack)
        fleet.servers = [fleet.launch(i) for i in range(len(PODS))]
        for server in fleet.servers:
            server.wait_ready()
        fleet.wait_converged(configured)
        yield fleet
        for server in fleet.servers:  # stop them together (the exit stack then waits for each)
            server.process.send_signal(signal.SIGTERM)
    double.close()


def test_cluster_mode_needs_the_pod_identity() -> None:
    with pytest.raises(ValidationError, match="SERVING_POD_NAME"):
        Settings(cluster_mode=True, cluster_pod_selector=SELECTOR)
    assert not Settings().cluster_mode  # off by default: make serve is a single server


def test_rollout_view_from_replica_states() -> None:
    now = datetime.now(UTC)
    desired = DesiredModel("m", rollout_id="r1", rollout_outcome="rolling_out", updated_at=now.isoformat())
    done = ReplicaState("a", "m", None, "ready", None, "r1", now.isoformat())
    loading = replace(done, name="b", phase="loading")
    garbage = ReplicaState.parse("c", "{not json")
    assert garbage.phase == "unknown" and garbage.model_id is None
    rollout = Rollout(desired, [done, loading, garbage])
    assert rollout.as_dict()["message"] == "rolling out 1/3" and rollout.in_progress
    stale = replace(desired, updated_at=(now - timedelta(seconds=ROLLOUT_TIMEOUT_S + 1)).isoformat())
    assert not Rollout(stale, [done, loading]).in_progress  # a stuck rollout stops blocking POST /model
    assert Rollout(desired, [done, replace(loading, phase="ready")]).phase == "ready"
    assert DesiredModel.from_data(desired.to_data()) == desired


def test_start_up_serves_the_desired_model_and_publishes_each_replica(fleet: Fleet) -> None:
    view = fleet.wait_converged(fleet.configured)
    assert sorted(r["name"] for r in view["replicas"]) == list(PODS)  # the selector left the other pod out
    assert view["connection"] == "connected" and view["rollout"]["phase"] == "ready"
    for name in PODS:  # what `kubectl get pods -o jsonpath=...replica-state` shows
        state = json.loads(
            fleet.double.get("pods", NAMESPACE, name)["metadata"]["annotations"][REPLICA_STATE_ANNOTATION]
        )
        assert state["model_id"] == fleet.configured and state["phase"] == "ready" and state["updated_at"]
    for url in fleet.urls:
        assert metric(url, FLEET_REPLICA_CONVERGED) == 1 and metric(url, KUBE_API_CONNECTED) == 1


def test_post_to_one_replica_rolls_out_to_all_under_traffic(fleet: Fleet) -> None:
    with Traffic(*fleet.urls) as traffic:
        while len(traffic.results) < 6:
            time.sleep(0.05)
        started = time.monotonic()
        response = fleet.post(0, "tiny-b")
        assert response.status_code == 202, response.text
        assert response.headers["Location"] == "/status"
        body = response.json()
        assert body["desired"]["model_id"] == "tiny-b" and body["desired"]["rollout_id"]
        assert body["desired"]["previous"] == {"model_id": fleet.configured, "revision": None}
        view = fleet.wait_converged("tiny-b")
        print(f"\n3 replicas converged in {time.monotonic() - started:.1f} s")
        served = len(traffic.results)
        while len(traffic.results) < served + 6:
            time.sleep(0.05)
    failures = [r for r in traffic.results if r[0] != 200]
    print(f"{len(traffic.results)} requests during the rollout, {len(failures)} failed")
    assert not failures, failures
    assert (
        view["rollout"]["id"] == body["desired"]["rollout_id"] and view["rollout"]["message"] == "ready 3/3"
    )
    for url in fleet.urls:
        assert httpx.get(f"{url}/model").json()["model_id"].endswith("/tiny-b")
    assert fleet.post(2, "tiny-b").status_code == 200  # the fleet already serves it: a no-op
    for url in fleet.urls:
        assert metric(url, 'serving_fleet_rollouts_total{outcome="ready"}') >= 1


def test_concurrent_posts_to_two_replicas_one_wins(fleet: Fleet) -> None:
    first, second = [m for m in EVERYWHERE if m != fleet.settled()][:2]
    answers: dict[str, httpx.Response] = {}
    barrier = threading.Barrier(2)

    def post(index: int, model_id: str) -> None:
        barrier.wait()
        answers[model_id] = fleet.post(index, model_id)

    threads = [threading.Thread(target=post, args=a) for a in ((0, first), (1, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = sorted(r.status_code for r in answers.values())
    assert statuses == [202, 409], {m: r.text for m, r in answers.items()}
    loser = next(r for r in answers.values() if r.status_code == 409)
    assert loser.headers["Retry-After"] and loser.json()["error"]["type"] == "deployment_in_progress"
    winner = next(m for m, r in answers.items() if r.status_code == 202)
    fleet.wait_converged(winner)


def test_a_model_failing_on_some_replicas_rolls_the_whole_fleet_back(fleet: Fleet) -> None:
    before = fleet.settled()
    response = fleet.post(0, "tiny-c")  # valid on chat-0; absent from the roots of chat-1 and chat-2
    assert response.status_code == 202, response.text
    view = fleet.wait(lambda f: f["rollout"]["phase"] == "rolled_back" and converged(f, before))
    rollout = view["rollout"]
    assert rollout["failed_replica"] in ("chat-1", "chat-2"), rollout
    assert "'tiny-c' does not exist" in rollout["reason"], rollout
    assert (
        rollout["failed_replica"] in rollout["message"]
        and rollout["id"] == response.json()["desired"]["rollout_id"]
    )
    data = fleet.configmap()
    assert (data["model_id"], data["rollout_outcome"]) == (before, "rolled_back")
    # Both replicas failed, yet the desired model was written back once.
    rolled_back_writes = [
        e
        for e in fleet.double.events
        if e[1] == "configmaps" and e[3]["data"].get("rollout_outcome") == "rolled_back"
    ]
    assert len(rolled_back_writes) == 1, rolled_back_writes
    for url in fleet.urls:
        assert httpx.get(f"{url}/model").json()["model_id"].endswith(f"/{before}")
        assert metric(url, 'serving_fleet_rollouts_total{outcome="rolled_back"}') == 1


def test_a_restarted_replica_serves_nothing_but_the_desired_model(fleet: Fleet) -> None:
    good = fleet.settled()
    # kubectl apply of a manifest naming tiny-c: no previous model recorded, so nothing rolls back;
    # chat-1 and chat-2 keep serving the good model and say why they did not follow.
    apply_manifest(fleet, "tiny-c")
    view = fleet.wait(lambda f: [r["phase"] for r in f["replicas"]] == ["ready", "failed", "failed"])
    assert (
        view["rollout"]["message"] == "rolling out 1/3"
        and "'tiny-c' does not exist" in view["replicas"][2]["error"]
    )
    assert fleet.servers[2].terminate() == 0
    fleet.servers[2] = fleet.launch(2)
    deadline = time.monotonic() + 120
    while True:  # until its start-up deployment has failed (it listens before it deploys)
        assert time.monotonic() < deadline and fleet.servers[2].process.poll() is None
        with contextlib.suppress(httpx.TransportError):
            if (fleet.status(2)["deployment"] or {}).get("phase") == "failed":
                break
        time.sleep(0.1)
    status = fleet.status(2)
    assert not status["ready"] and len(status["history"]) == 1  # it never served --model meanwhile
    assert httpx.get(f"{fleet.urls[2]}/readyz").status_code == 503
    assert "'tiny-c' does not exist" in status["deployment"]["error"]
    apply_manifest(fleet, good)
    fleet.servers[2].wait_ready()
    assert httpx.get(f"{fleet.urls[2]}/model").json()["model_id"].endswith(f"/{good}")
    assert fleet.status(2)["deployment"]["trigger"] == "fleet"
    fleet.wait_converged(good)


def test_replicas_serve_through_an_api_outage_and_resync(fleet: Fleet) -> None:
    target = another(fleet.settled())
    with Traffic(*fleet.urls) as traffic:
        fleet.double.stop()
        for index in range(len(PODS)):
            fleet.wait(lambda f: f["connection"] == "disconnected", index=index)
        assert all(metric(url, KUBE_API_CONNECTED) == 0 for url in fleet.urls)
        refused = fleet.post(0, "tiny-d")
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "kube_api_unavailable"
        served = len(traffic.results)
        while len(traffic.results) < served + 6:
            time.sleep(0.05)
        fleet.double.start()
        # A GitOps-style write (kubectl apply of a manifest: the other keys empty) while they resync.
        apply_manifest(fleet, target)
        view = fleet.wait_converged(target)
    assert view["connection"] == "connected"
    failures = [r for r in traffic.results if r[0] != 200]
    assert not failures, failures


def test_a_410_gone_watch_leads_to_a_relist(fleet: Fleet) -> None:
    target = another(fleet.settled())
    lists, gone = fleet.double.requests["list configmaps"], fleet.double.requests["410"]
    fleet.double.expire_watches()
    deadline = time.monotonic() + 60
    while fleet.double.requests["410"] < gone + len(PODS) or fleet.double.requests[
        "list configmaps"
    ] < lists + len(PODS):
        assert time.monotonic() < deadline, fleet.double.requests
        time.sleep(0.1)
    assert fleet.post(1, target).status_code == 202
    fleet.wait_converged(target)
