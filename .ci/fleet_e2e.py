"""CI's kind job, fleet part: the replicas of the model server converge on one desired model.

Run by ``.github/workflows/ci-cd.yml`` after ``kubectl apply -f dist/`` of a cluster-mode release with two
or more replicas. It proves what only a real cluster can (the tests use an API double): the projected
token, the Role and the RoleBinding let the replicas read, watch and patch what they need; ``POST
/model`` through the Service reaches one replica and every replica converges (fleet ``/status`` and each
pod's published annotation); a replacement pod serves the desired model, not ``--model``; a model every
replica fails to load rolls the whole fleet back.

Needs kubectl on PATH and these variables: APP_NAMESPACE, APP_SERVICE, APP_DEPLOYMENT,
APP_DESIRED_MODEL_CONFIGMAP, APP_POD_SELECTOR (the find-model-server action exports them),
SERVING_ADMIN_TOKEN, IMAGE (the server image, also the in-cluster client), E2E_MODEL (a hub model other
than the manifests' --model) and E2E_FAILING_MODEL (a hub repo that exists but cannot load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Where each replica publishes its state (the contract with the server's reconciler).
REPLICA_STATE_ANNOTATION = "model-serving.dev/replica-state"
#: The pod that sends requests to the Service from inside the cluster (port-forward pins one pod).
CLIENT = "fleet-e2e-client"
TIMEOUT_S = 900

NAMESPACE = os.environ["APP_NAMESPACE"]
SELECTOR = os.environ["APP_POD_SELECTOR"]

# Run inside the client pod: one HTTP request, its status and JSON body printed as one JSON line.
_REQUEST = """
import json, sys, urllib.error, urllib.request
method, url, body, token = sys.argv[1:5]
headers = {"Content-Type": "application/json", "Authorization": "Bearer " + token}
request = urllib.request.Request(url, data=body.encode() or None, method=method, headers=headers)
try:
    with urllib.request.urlopen(request, timeout=60) as response:
        status, text = response.status, response.read().decode()
except urllib.error.HTTPError as error:
    status, text = error.code, error.read().decode()
print(json.dumps({"status": status, "body": json.loads(text) if text else None}))
"""


def kubectl(*args: str) -> str:
    return subprocess.run(
        ["kubectl", "-n", NAMESPACE, *args], check=True, capture_output=True, text=True
    ).stdout


def through_service(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """A request to the Service, which picks the replica: ``(status, JSON body)``."""
    service = os.environ["APP_SERVICE"]
    port = kubectl("get", "service", service, "-o", "jsonpath={.spec.ports[0].port}")
    token = os.environ["SERVING_ADMIN_TOKEN"]
    payload = json.dumps(body) if body else ""
    url = f"http://{service}:{port}{path}"
    answer = json.loads(kubectl("exec", CLIENT, "--", "python", "-c", _REQUEST, method, url, payload, token))
    return answer["status"], answer["body"]


def wait_for(what: str, condition: Callable[[], T | None]) -> T:
    deadline = time.monotonic() + TIMEOUT_S
    while (result := condition()) is None or result is False:
        if time.monotonic() > deadline:
            sys.exit(f"timed out after {TIMEOUT_S}s waiting for {what}")
        time.sleep(5)
    return result


def replica_states() -> dict[str, dict[str, Any] | None]:
    """Each running pod's published state (None until it publishes one); terminating pods left out."""
    pods = json.loads(kubectl("get", "pods", "-l", SELECTOR, "-o", "json"))["items"]
    return {
        pod["metadata"]["name"]: json.loads(
            pod["metadata"].get("annotations", {}).get(REPLICA_STATE_ANNOTATION, "null")
        )
        for pod in pods
        if not pod["metadata"].get("deletionTimestamp")
    }


def desired_state() -> dict[str, str]:
    return json.loads(kubectl("get", "configmap", os.environ["APP_DESIRED_MODEL_CONFIGMAP"], "-o", "json"))[
        "data"
    ]


def fleet_on(model_id: str, replicas: int, rollout_phase: str) -> dict[str, Any] | None:
    """The fleet view once every replica serves ``model_id`` and the rollout is in ``rollout_phase``."""
    states = replica_states()
    try:
        status, body = through_service("GET", "/status")
    except subprocess.CalledProcessError as error:  # e.g. the Service between endpoints: ask again
        print(error.stderr, flush=True)
        return None
    fleet = body.get("fleet") if status == 200 else None
    print(json.dumps({"pods": states, "fleet": fleet}), flush=True)
    on_model = len(states) == replicas and all(
        state and state["model_id"] == model_id and state["phase"] == "ready" for state in states.values()
    )
    if not (on_model and fleet and fleet["desired"]["model_id"] == model_id):
        return None
    listed = [replica["model_id"] for replica in fleet["replicas"]]
    rollout = fleet["rollout"]
    if listed != [model_id] * replicas or rollout["phase"] != rollout_phase:
        return None
    # A finished rollout counts every replica; after a rollback only the model and phase are asserted.
    return fleet if rollout_phase != "ready" or rollout["ready"] == rollout["total"] == replicas else None


def deploy(model_id: str) -> tuple[int, Any]:
    """POST /model through the Service, retried while another rollout runs (409)."""

    def attempt() -> tuple[int, Any] | None:
        status, body = through_service("POST", "/model", {"model_id": model_id})
        return None if status == 409 else (status, body)

    status, body = wait_for(f"POST /model {model_id} to be accepted", attempt)
    print(f"POST /model {model_id}: {status} {json.dumps(body)}", flush=True)
    return status, body


def main() -> None:
    model, failing = os.environ["E2E_MODEL"], os.environ["E2E_FAILING_MODEL"]
    replicas = int(
        kubectl("get", "deployment", os.environ["APP_DEPLOYMENT"], "-o", "jsonpath={.spec.replicas}")
    )
    assert replicas >= 2, "the fleet scenario needs two or more replicas"
    kubectl(
        "run", CLIENT, f"--image={os.environ['IMAGE']}", "--restart=Never", "--command", "--", "sleep", "3600"
    )
    kubectl("wait", "--for=condition=Ready", f"pod/{CLIENT}", "--timeout=120s")
    try:
        # 1. One POST through the Service; every replica converges (200: the README example deployed it).
        status, _ = deploy(model)
        assert status in (200, 202), status
        wait_for(f"every replica on {model}", lambda: fleet_on(model, replicas, "ready"))
        assert desired_state()["model_id"] == model

        # 2. A replacement pod starts on the desired model, not on the manifests' --model.
        victim = sorted(replica_states())[0]
        kubectl("delete", "pod", victim, "--wait=false")
        wait_for(
            f"{victim}'s replacement on {model}",
            lambda: victim not in replica_states() and fleet_on(model, replicas, "ready"),
        )

        # 3. A model no replica can load: the fleet rolls back to the previous one, together.
        status, body = deploy(failing)
        assert status == 202, (status, body)
        fleet = wait_for(f"the fleet back on {model}", lambda: fleet_on(model, replicas, "rolled_back"))
        assert fleet["rollout"]["failed_replica"] and fleet["rollout"]["reason"], fleet["rollout"]
        desired = desired_state()
        assert (desired["model_id"], desired["rollout_outcome"]) == (model, "rolled_back"), desired
        print(f"rolled back: {fleet['rollout']['failed_replica']}: {fleet['rollout']['reason']}")
    finally:
        kubectl("delete", "pod", CLIENT, "--wait=false")


if __name__ == "__main__":
    main()
