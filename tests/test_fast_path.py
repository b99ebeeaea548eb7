"""The fast path (int4 weight-only quantization at warming) on tiny real models: the same greedy
tokens as the unquantized model, and a fallback, reported in ``GET /model``, where it cannot apply."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp.test_utils import TestClient
from transformers import AutoModelForCausalLM

from service.engine import Engine, SamplingParams
from service.handle import ModelHandle
from service.lifecycle import fast_path, loader
from service.lifecycle.sources import ModelSource, SourceKind
from service.metrics import ServingMetrics
from tests.test_api import start
from tests.test_engine import consume

PROMPTS = ["The capital of France is", "Hello!", "Prometheus scrapes", "the quick brown fox", "0123"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def grid_model(tiny_model_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model A with every linear weight on an int4 grid of groups of 32 (as the bundled Q4_1 weights
    are): ``(q + offset) / 64`` with q in 0..15 and both ends present in every group, so an int4
    min-max quantization holds it exactly and only the kernels' arithmetic differs."""
    out = tmp_path_factory.mktemp("grid") / "tiny-grid"
    shutil.copytree(tiny_model_a, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                rows, cols = module.weight.shape
                q = torch.randint(0, 16, (rows, cols // 32, 32), generator=generator)
                q[..., 0], q[..., 1] = 0, 15
                offset = torch.randint(-12, -3, (rows, cols // 32, 1), generator=generator)
                module.weight.copy_(((q + offset).float() / 64).reshape(rows, cols))
    model.save_pretrained(out, safe_serialization=True)
    return out


def load(path: Path, dtype: str = "bfloat16") -> ModelHandle:
    return loader.load(path, ModelSource(str(path), SourceKind.LOCAL), device="cpu", dtype=dtype)


async def greedy_runs(handle: ModelHandle) -> list[list[int]]:
    """Every prompt's greedy tokens, generated concurrently (so decode steps run batched)."""
    engine = Engine(
        max_running=8,
        max_queued=8,
        request_timeout_s=120,
        metrics=ServingMetrics.create(default_collectors=False),
    )
    await engine.start()
    try:
        prompts = [handle.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        runs = await asyncio.gather(*(consume(engine.submit(handle, ids, GREEDY)) for ids in prompts))
    finally:
        await engine.stop()
    return [run.token_ids for run in runs]


async def test_fast_path_gives_the_unquantized_greedy_tokens(grid_model: Path) -> None:
    eager, fast = load(grid_model), load(grid_model)
    report = fast_path.prepare(fast, "auto")
    assert report.enabled and report.kind == "int4_weight_only", report
    plain = (torch.Tensor, torch.nn.Parameter)
    assert type(fast.model.model.layers[0].mlp.down_proj.weight) not in plain
    assert type(fast.model.lm_head.weight) in plain  # the head stays as loaded
    assert await greedy_runs(fast) == await greedy_runs(eager)


@pytest.mark.parametrize(
    ("dtype", "quantization", "reason"),
    [("float32", "auto", "needs bfloat16"), ("bfloat16", "none", "SERVING_QUANTIZATION=none")],
)
def test_fast_path_falls_back_where_it_cannot_apply(
    grid_model: Path, dtype: str, quantization: str, reason: str
) -> None:
    handle = load(grid_model, dtype)
    weights = [m.weight for m in handle.model.modules() if isinstance(m, torch.nn.Linear)]
    report = fast_path.prepare(handle, quantization)
    assert not report.enabled and report.kind == "none" and reason in report.reason
    after = [m.weight for m in handle.model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(a is b for a, b in zip(after, weights, strict=True))


async def test_model_reports_the_fast_path(aiohttp_client: Any, tmp_path: Path, grid_model: Path) -> None:
    client: TestClient = await start(aiohttp_client, tmp_path, grid_model)
    body = await (await client.get("/model")).json()
    assert body["fast_path"]["enabled"] is True and body["fast_path"]["kind"] == "int4_weight_only"
    reply = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status == 200


async def test_model_reports_why_the_fast_path_is_off(
    aiohttp_client: Any, tmp_path: Path, grid_model: Path
) -> None:
    client: TestClient = await start(aiohttp_client, tmp_path, grid_model, dtype="float32")
    body = await (await client.get("/model")).json()
    assert body["fast_path"] == {
        "enabled": False,
        "kind": "none",
        "reason": "int4 weight-only kernel needs bfloat16 weights, not float32",
    }
