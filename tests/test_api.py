"""Every endpoint of the HTTP API, success and failure, in-process, serving a tiny real model."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api import console, keys
from service.app import create_app
from service.metrics import DEPLOYMENTS_TOTAL, HTTP_REQUESTS_TOTAL, MODEL_INFO
from service.settings import Settings

ADMIN = {"Authorization": "Bearer s3cret"}
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, "temperature": 0}


async def wait_for_phase(client: TestClient, deployment_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """Poll /status until the deployment ``deployment_id`` is ready or failed."""
    async with asyncio.timeout(timeout_s):
        while True:
            status = await (await client.get("/status")).json()
            dep = status["deployment"]
            if dep and dep["id"] == deployment_id and dep["phase"] in ("ready", "failed"):
                return status
            await asyncio.sleep(0.05)


async def start(aiohttp_client: Any, tmp_path: Path, model: Path | str, **overrides: Any) -> TestClient:
    settings = Settings(model=str(model), state_dir=tmp_path / "state", torch_threads=1, **overrides)
    client = await aiohttp_client(create_app(settings))
    status = await (await client.get("/status")).json()
    await wait_for_phase(client, status["deployment"]["id"])
    return client


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path, models_root: Path) -> TestClient:
    return await start(
        aiohttp_client,
        tmp_path,
        tiny_model_a,
        model_root=models_root,
        admin_token="s3cret",
        max_body_bytes=4096,
        max_prompt_tokens=64,
    )


async def deploy(client: TestClient, model_id: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post("/model", json={"model_id": model_id, **extra}, headers=ADMIN)
    return response.status, await response.json()


def assert_error(status: int, body: dict[str, Any], expected: int) -> None:
    assert status == expected, body
    assert set(body) == {"error"} and body["error"]["type"] and body["error"]["message"], body


# --- probes and metrics ---


async def test_probes(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json()) == {"status": "ready"}


async def test_metrics_exposition(client: TestClient, tiny_model_a: Path) -> None:
    await client.post("/completion", json=CHAT)
    text = await (await client.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "process_start_time_seconds" in families and "python_gc_collections" in families
    info = families[MODEL_INFO]
    assert [(s.labels["model_id"], s.value) for s in info.samples] == [(str(tiny_model_a), 1.0)]
    requests = families[HTTP_REQUESTS_TOTAL.removesuffix("_total")]
    assert any(
        s.labels == {"route": "/completion", "method": "POST", "status": "200"} for s in requests.samples
    )
    deployments = families[DEPLOYMENTS_TOTAL.removesuffix("_total")]
    assert any(s.labels.get("result") == "succeeded" and s.value == 1 for s in deployments.samples)


# --- completion ---


async def test_completion(client: TestClient, tiny_model_a: Path) -> None:
    response = await client.post("/completion", json=CHAT)
    assert response.status == 200
    body = await response.json()
    assert body["model"] == str(tiny_model_a)
    assert body["message"]["role"] == "assistant" and isinstance(body["message"]["content"], str)
    assert body["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["id"] and response.headers["X-Request-Id"] == body["id"]


async def test_completion_is_deterministic_at_temperature_zero(client: TestClient) -> None:
    first = await (await client.post("/completion", json=CHAT)).json()
    second = await (await client.post("/completion", json=CHAT)).json()
    assert first["message"] == second["message"]


async def test_completion_streams_server_sent_events(client: TestClient) -> None:
    response = await client.post("/completion", json={**CHAT, "stream": True, "max_tokens": 6})
    assert response.status == 200 and response.content_type == "text/event-stream"
    events = [
        json.loads(line[6:]) for line in (await response.text()).splitlines() if line.startswith("data: ")
    ]
    *deltas, last = events
    assert all("finish_reason" not in e and "usage" not in e for e in deltas)
    assert last["finish_reason"] in ("stop", "length") and last["usage"]["completion_tokens"] <= 6
    whole = await (await client.post("/completion", json={**CHAT, "max_tokens": 6})).json()
    assert "".join(e["delta"] for e in events) == whole["message"]["content"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"messages": []}, 422),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 422),
        ({"messages": [{"role": "tool", "content": "hi"}]}, 422),  # /completion knows no tools
        ({"messages": [{"role": "user"}]}, 422),
        ({"messages": "hello"}, 422),
        ({"messages": [{"role": "user", "content": 5}]}, 422),
        ({**CHAT, "max_tokens": 0}, 422),
        ({**CHAT, "max_tokens": 10**6}, 422),
        ({**CHAT, "max_tokens": "many"}, 422),
        ({**CHAT, "temperature": -1}, 422),
        ({**CHAT, "top_p": -0.1}, 422),
        ({**CHAT, "seed": 2**63}, 422),
        ({"messages": [{"role": "user", "content": []}]}, 422),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 422),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
        ),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 422),
        ({**CHAT, "unknown_field": 1}, 422),
        ({"messages": [{"role": "user", "content": "word " * 200}]}, 413),  # over max_prompt_tokens
        ([1, 2, 3], 422),
    ],
)
async def test_completion_rejects_bad_input(client: TestClient, body: Any, status: int) -> None:
    response = await client.post("/completion", json=body)
    assert_error(response.status, await response.json(), status)


async def reply(client: TestClient, body: dict[str, Any]) -> str:
    response = await client.post("/completion", json=body)
    assert response.status == 200, await response.text()
    return (await response.json())["message"]["content"]


async def test_completion_takes_the_chat_shapes_openai_clients_send(client: TestClient) -> None:
    question = "What is the capital of France?"
    plain = await reply(client, {**CHAT, "messages": [{"role": "user", "content": question}]})
    parts = [{"type": "text", "text": question}]
    assert await reply(client, {**CHAT, "messages": [{"role": "user", "content": parts}]}) == plain
    split = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the capital?"}]
    joined = await reply(client, {**CHAT, "messages": [{"role": "user", "content": "What is\nthe capital?"}]})
    assert await reply(client, {**CHAT, "messages": [{"role": "user", "content": split}]}) == joined
    system = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": question}]
    developer = [{**system[0], "role": "developer"}, system[1]]
    assert await reply(client, {**CHAT, "messages": developer}) == await reply(
        client, {**CHAT, "messages": system}
    )
    history = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Hi", "name": "alice"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": ""},
    ]
    assert isinstance(await reply(client, {**CHAT, "messages": history}), str)


async def test_seed_minus_one_is_random_and_top_p_zero_is_greedy(client: TestClient) -> None:
    greedy = await reply(client, CHAT)
    assert await reply(client, {**CHAT, "temperature": 1.0, "top_p": 0}) == greedy
    assert isinstance(await reply(client, {**CHAT, "temperature": 1.0, "seed": -1}), str)
    assert isinstance(await reply(client, {**CHAT, "temperature": 1.0, "seed": -(2**63)}), str)


async def test_malformed_json_is_400(client: TestClient) -> None:
    response = await client.post(
        "/completion", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(response.status, await response.json(), 400)


async def test_wrong_media_type_is_415(client: TestClient) -> None:
    response = await client.post("/completion", data=b"hello", headers={"Content-Type": "text/plain"})
    assert_error(response.status, await response.json(), 415)


async def test_oversized_body_is_413(client: TestClient) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
    response = await client.post("/completion", json=big)
    assert_error(response.status, await response.json(), 413)


async def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    response = await client.get("/nowhere")
    assert_error(response.status, await response.json(), 404)
    response = await client.delete("/model")
    assert_error(response.status, await response.json(), 405)


async def test_server_survives_bad_requests(client: TestClient) -> None:
    for payload in (b"", b"null", b"\xff\xfe", b"[" * 1000):
        await client.post("/completion", data=payload, headers={"Content-Type": "application/json"})
    assert (await client.post("/completion", json=CHAT)).status == 200


# --- model lifecycle ---


async def test_get_model(client: TestClient, tiny_model_a: Path) -> None:
    body = await (await client.get("/model")).json()
    assert body["model_id"] == str(tiny_model_a)
    assert body["source"] == "local" and body["device"] == "cpu" and body["dtype"] == "bfloat16"
    assert body["parameters"] > 0 and body["loaded_at"]


async def test_deploy_swaps_model(client: TestClient, tiny_model_b: Path) -> None:
    status, body = await deploy(client, "tiny-b")
    assert status == 202, body
    assert body["phase"] == "pending"
    final = await wait_for_phase(client, body["id"])
    assert final["deployment"]["phase"] == "ready", final
    assert final["serving"]["model_id"] == str(tiny_model_b)
    phases = final["deployment"]["phase_seconds"]
    assert {"pending", "resolving", "loading", "warming", "total"} <= set(phases)
    assert final["history"][0]["id"] == body["id"]  # newest first
    assert (await (await client.get("/model")).json())["model_id"] == str(tiny_model_b)
    # Deploying what already serves is a no-op.
    status, again = await deploy(client, "tiny-b")
    assert status == 200 and again["id"] == body["id"]


async def test_deploy_location_header(client: TestClient) -> None:
    response = await client.post("/model", json={"model_id": "tiny-b"}, headers=ADMIN)
    assert response.status == 202 and response.headers["Location"] == "/status"
    await wait_for_phase(client, (await response.json())["id"])


async def test_second_deployment_while_one_runs_is_409(client: TestClient) -> None:
    status, first = await deploy(client, "tiny-b")
    assert status == 202
    status, body = await deploy(client, "tiny-a")
    assert_error(status, body, 409)
    await wait_for_phase(client, first["id"])


@pytest.mark.parametrize(
    ("model_id", "status"),
    [
        ("does-not-exist", 404),
        ("../../etc", 403),
        ("/etc", 403),
        ("nobody-org/missing-model", 404),  # hub id, absent from the offline cache
        ("bad id with spaces/!!", 404),
    ],
)
async def test_deploy_rejects_unknown_models(client: TestClient, model_id: str, status: int) -> None:
    code, body = await deploy(client, model_id)
    assert_error(code, body, status)
    assert (await client.get("/readyz")).status == 200


async def test_deploy_needs_the_admin_token(client: TestClient) -> None:
    response = await client.post("/model", json={"model_id": "tiny-b"})
    assert_error(response.status, await response.json(), 401)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    response = await client.post(
        "/model", json={"model_id": "tiny-b"}, headers={"Authorization": "Bearer nope"}
    )
    assert_error(response.status, await response.json(), 403)


async def test_deploy_body_validation(client: TestClient) -> None:
    for body in ({}, {"model_id": ""}, {"model_id": 3}, {"model_id": "tiny-b", "force": True}):
        response = await client.post("/model", json=body, headers=ADMIN)
        assert_error(response.status, await response.json(), 422)


async def test_allowlist(aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path, models_root: Path) -> None:
    client = await start(
        aiohttp_client, tmp_path, tiny_model_a, model_root=models_root, allowed_models=["tiny-a*"]
    )
    response = await client.post("/model", json={"model_id": "tiny-b"})
    assert_error(response.status, await response.json(), 403)


def broken_copy(source: Path, root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


async def test_failed_deployments_keep_the_old_model(
    client: TestClient, tiny_model_a: Path, tiny_model_b: Path, models_root: Path
) -> None:
    corrupt = broken_copy(tiny_model_b, models_root, "corrupt-weights")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}garbage")
    no_tokenizer = broken_copy(tiny_model_b, models_root, "no-tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / f).unlink()
    for name, reason in (("corrupt-weights", "safetensors"), ("no-tokenizer", "")):
        status, body = await deploy(client, name)
        assert status == 202
        final = await wait_for_phase(client, body["id"])
        assert final["deployment"]["phase"] == "failed" and reason in final["deployment"]["error"], final
        assert final["ready"] and final["serving"]["model_id"] == str(tiny_model_a)
        assert (await client.post("/completion", json=CHAT)).status == 200
    # The next good deployment still works.
    status, body = await deploy(client, "tiny-b")
    assert (await wait_for_phase(client, body["id"]))["serving"]["model_id"] == str(tiny_model_b)


async def test_redeploy_after_a_failure_returns_the_serving_deployment(
    client: TestClient, tiny_model_b: Path, models_root: Path
) -> None:
    status, good = await deploy(client, "tiny-b")
    await wait_for_phase(client, good["id"])
    broken = broken_copy(tiny_model_b, models_root, "no-weights")
    (broken / "model.safetensors").unlink()
    status, failed = await deploy(client, "no-weights")
    assert (await wait_for_phase(client, failed["id"]))["deployment"]["phase"] == "failed"
    status, again = await deploy(client, "tiny-b")
    assert status == 200 and again["id"] == good["id"] and again["phase"] == "ready", again


async def test_memory_budget_refuses_before_loading(
    aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path, models_root: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, tiny_model_a, model_root=models_root, max_model_bytes=1024)
    status = await (await client.get("/status")).json()
    assert status["deployment"]["phase"] == "failed" and "memory budget" in status["deployment"]["error"]
    assert "loading" not in status["deployment"]["phase_seconds"]  # refused before loading
    assert (await client.get("/readyz")).status == 503
    response = await client.post("/completion", json=CHAT)
    assert_error(response.status, await response.json(), 503)


async def test_openapi_document_lists_every_route(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    served = {
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and route.resource.canonical not in ("/openapi.json", console.PAGE, console.ASSETS)  # not API
    }
    assert documented == served


async def test_swapped_out_model_is_freed(client: TestClient, tiny_model_b: Path) -> None:
    manager = client.app[keys.MANAGER]
    old = weakref.ref(manager.active)
    await client.post("/completion", json=CHAT)  # the engine has used (and must then forget) the old handle
    status, body = await deploy(client, "tiny-b")
    assert status == 202
    assert (await wait_for_phase(client, body["id"]))["deployment"]["phase"] == "ready"
    gc.collect()
    assert old() is None, gc.get_referrers(old())


async def test_cors_is_off_unless_configured(client: TestClient) -> None:
    response = await client.get("/model", headers={"Origin": "https://app.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_for_configured_origins(aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path) -> None:
    client = await start(aiohttp_client, tmp_path, tiny_model_a, cors_origins=["https://app.example"])
    preflight = await client.options(
        "/completion",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert (
        preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    )
    streamed = await client.post(
        "/completion", json={**CHAT, "stream": True}, headers={"Origin": "https://app.example"}
    )
    assert streamed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = await client.get("/model", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
