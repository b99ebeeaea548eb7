"""Lifecycle metrics move by the right amount for known deployments (counts and totals, never times)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from service.api import keys
from service.app import create_app
from service.lifecycle.loader import count_parameters
from service.metrics import (
    DEPLOYMENT_PHASE_DURATION_SECONDS,
    MODEL_DOWNLOAD_BYTES_TOTAL,
    MODEL_SWAP_DURATION_SECONDS,
    MODEL_WEIGHTS_BYTES,
    MODELS_RESIDENT,
    TIMED_DEPLOYMENT_PHASES,
)
from service.settings import Settings
from tests.conftest import TINY_HUB_ID
from tests.test_api import broken_copy, deploy, wait_for_phase

BF16_BYTES = 2


def _phase_counts(registry: CollectorRegistry) -> dict[str, float | None]:
    return {
        phase: registry.get_sample_value(f"{DEPLOYMENT_PHASE_DURATION_SECONDS}_count", {"phase": phase})
        for phase in TIMED_DEPLOYMENT_PHASES
    }


async def test_phase_swap_and_resident_weight_metrics(
    aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path, tiny_model_b: Path, models_root: Path
) -> None:
    registry = CollectorRegistry()
    settings = Settings(
        model=str(tiny_model_a), state_dir=tmp_path / "state", torch_threads=1, model_root=models_root
    )
    client = await aiohttp_client(create_app(settings, registry=registry))
    await wait_for_phase(client, (await (await client.get("/status")).json())["deployment"]["id"])
    value = registry.get_sample_value
    size_a, size_b = (count_parameters(m) * BF16_BYTES for m in (tiny_model_a, tiny_model_b))

    # Start-up from a local folder: each phase once, nothing downloaded, one model resident.
    counts = {"pending": 1, "resolving": 1, "downloading": 0, "loading": 1, "warming": 1}
    assert _phase_counts(registry) == counts
    assert value(f"{MODEL_SWAP_DURATION_SECONDS}_count") == 1
    assert value(MODEL_DOWNLOAD_BYTES_TOTAL) == 0
    assert (value(MODELS_RESIDENT), value(MODEL_WEIGHTS_BYTES)) == (1, size_a)

    # A swap while the old model is still held (as by a request in flight): both are resident.
    held = client.app[keys.MANAGER].active
    status, body = await deploy(client, "tiny-b")
    assert status == 202
    assert (await wait_for_phase(client, body["id"]))["deployment"]["phase"] == "ready"
    assert (value(MODELS_RESIDENT), value(MODEL_WEIGHTS_BYTES)) == (2, size_a + size_b)
    del held
    gc.collect()
    assert (value(MODELS_RESIDENT), value(MODEL_WEIGHTS_BYTES)) == (1, size_b)
    counts = {phase: 2 * n for phase, n in counts.items()}
    assert _phase_counts(registry) == counts
    assert value(f"{MODEL_SWAP_DURATION_SECONDS}_count") == 2

    # A deployment that fails while loading: its phases up to loading count, no swap, nothing stays resident.
    corrupt = broken_copy(tiny_model_b, models_root, "corrupt-for-metrics")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}garbage")
    status, body = await deploy(client, "corrupt-for-metrics")
    assert (await wait_for_phase(client, body["id"]))["deployment"]["phase"] == "failed"
    counts["pending"] += 1
    counts["resolving"] += 1
    assert _phase_counts(registry) == counts  # it failed reading the headers, before loading
    assert value(f"{MODEL_SWAP_DURATION_SECONDS}_count") == 2
    gc.collect()
    assert (value(MODELS_RESIDENT), value(MODEL_WEIGHTS_BYTES)) == (1, size_b)


async def test_a_cached_hub_model_downloads_nothing(
    aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path, hf_home: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hf_home / "hub"))
    registry = CollectorRegistry()
    settings = Settings(model=TINY_HUB_ID, state_dir=tmp_path / "state", torch_threads=1)
    client = await aiohttp_client(create_app(settings, registry=registry))
    status = await wait_for_phase(client, (await (await client.get("/status")).json())["deployment"]["id"])
    assert status["deployment"]["phase"] == "ready", status
    assert (
        registry.get_sample_value(f"{DEPLOYMENT_PHASE_DURATION_SECONDS}_count", {"phase": "downloading"}) == 1
    )
    assert registry.get_sample_value(MODEL_DOWNLOAD_BYTES_TOTAL) == 0
