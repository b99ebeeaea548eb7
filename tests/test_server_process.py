"""A real server process: swaps under traffic, restart persistence, hub ids, the bundled model."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import BUNDLED_MODEL_ALIAS
from tests.conftest import TINY_HUB_ID
from tests.server_process import running_server

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


def wait_deployed(base_url: str, deployment_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{base_url}/status").json()
        if status["deployment"]["id"] == deployment_id and status["deployment"]["phase"] in (
            "ready",
            "failed",
        ):
            return status
        time.sleep(0.05)
    raise TimeoutError(f"deployment {deployment_id} did not finish")


class Traffic:
    """Clients sending completions back to back until stopped, recording every answer; with several
    servers, each request goes to one picked at random (as a Service would)."""

    def __init__(self, *base_urls: str, clients: int = 3) -> None:
        self.base_urls = base_urls
        self.results: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                response = client.post(f"{random.choice(self.base_urls)}/completion", json=CHAT)
                model = response.json().get("model") if response.status_code == 200 else response.text
                self.results.append((response.status_code, model))

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_swap_under_traffic_drops_no_request(tmp_path: Path, tiny_model_a: Path, tiny_model_b: Path) -> None:
    with running_server(
        tmp_path, model=str(tiny_model_a), args=("--model-root", str(tiny_model_b.parent))
    ) as server:
        with Traffic(server.base_url) as traffic:
            while len(traffic.results) < 5:
                time.sleep(0.05)
            response = httpx.post(f"{server.base_url}/model", json={"model_id": "tiny-b"})
            assert response.status_code == 202
            status = wait_deployed(server.base_url, response.json()["id"])
            assert status["deployment"]["phase"] == "ready"
            served_after = len(traffic.results)
            while len(traffic.results) < served_after + 5:
                time.sleep(0.05)
        failures = [r for r in traffic.results if r[0] != 200]
        assert not failures, failures
        models = [m for _, m in traffic.results]
        assert models[0] == str(tiny_model_a) and models[-1] == str(tiny_model_b)
        assert set(models) == {str(tiny_model_a), str(tiny_model_b)}


def test_restart_serves_the_last_deployed_model(
    tmp_path: Path, tiny_model_a: Path, tiny_model_b: Path
) -> None:
    args = ("--model-root", str(tiny_model_b.parent))
    with running_server(tmp_path, model=str(tiny_model_a), args=args) as server:
        deployment = httpx.post(f"{server.base_url}/model", json={"model_id": "tiny-b"}).json()
        assert wait_deployed(server.base_url, deployment["id"])["deployment"]["phase"] == "ready"
        assert server.terminate() == 0
    with running_server(tmp_path, model=str(tiny_model_a), args=args) as server:
        model = httpx.get(f"{server.base_url}/model").json()
        assert model["model_id"] == str(tiny_model_b)
        assert httpx.get(f"{server.base_url}/status").json()["deployment"]["trigger"] == "restore"


def test_hub_id_resolves_from_the_offline_cache(tmp_path: Path, tiny_model_a: Path, hf_home: Path) -> None:
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    with running_server(tmp_path, model=str(tiny_model_a), env=env) as server:
        response = httpx.post(f"{server.base_url}/model", json={"model_id": TINY_HUB_ID})
        assert response.status_code == 202, response.text
        status = wait_deployed(server.base_url, response.json()["id"])
        assert status["deployment"]["phase"] == "ready", status
        model = httpx.get(f"{server.base_url}/model").json()
        assert model["model_id"] == TINY_HUB_ID and model["source"] == "hub"
        completion = httpx.post(f"{server.base_url}/completion", json=CHAT, timeout=60)
        assert completion.status_code == 200 and completion.json()["model"] == TINY_HUB_ID
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert f'serving_model_info{{device="cpu",dtype="bfloat16",model_id="{TINY_HUB_ID}"' in metrics
        assert "_created" not in metrics  # the process entry point turns those series off


@pytest.mark.slow
def test_bundled_model_answers_coherently(tmp_path: Path) -> None:
    with running_server(tmp_path, model=BUNDLED_MODEL_ALIAS, ready_timeout_s=600) as server:
        question = {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0,
        }
        response = httpx.post(f"{server.base_url}/completion", json=question, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        assert "Paris" in body["message"]["content"], body
        assert body["model"] == BUNDLED_MODEL_ALIAS
        model = httpx.get(f"{server.base_url}/model").json()
        assert model["source"] == "bundled"
        # The conversion kept the GGUF's blocks: every linear layer is served from them (the Paris
        # above came through the fast path), or the reason says the kernel cannot run here.
        if model["fast_path"]["kernel"] is None:
            assert "kernel unavailable" in model["fast_path"]["reason"], model
        else:
            assert model["fast_path"]["layers"] == {"Q4_1": 210, "Q8_0": 1}, model
            assert model["fast_path"]["fused_layers"] == 30, model


def test_admin_token_is_never_logged(tmp_path: Path, tiny_model_a: Path, tiny_model_b: Path) -> None:
    token = "never-log-me-0123456789"
    args = ("--model-root", str(tiny_model_b.parent))
    with running_server(
        tmp_path, model=str(tiny_model_a), args=args, env={"SERVING_ADMIN_TOKEN": token}
    ) as server:
        headers = {"Authorization": f"Bearer {token}"}
        response = httpx.post(f"{server.base_url}/model", json={"model_id": "tiny-b"}, headers=headers)
        assert response.status_code == 202
        wait_deployed(server.base_url, response.json()["id"])
        assert (
            httpx.post(
                f"{server.base_url}/model",
                json={"model_id": "tiny-a"},
                headers={"Authorization": f"Bearer {token}x"},
            ).status_code
            == 403
        )
        logs = server.logs()
    assert '"msg": "starting"' in logs and token not in logs
