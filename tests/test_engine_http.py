"""The engine as the HTTP layer shows it, in-process on a tiny real model: opt-in per-request
timings (``X-Timings: true``) and a dead engine that the probes and every new request report."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api import keys
from service.metrics import ENGINE_HEALTHY
from tests.test_api import CHAT, assert_error, start

TIMINGS = {"X-Timings": "true"}
TIMING_KEYS = {
    "queue_ms",
    "prefill_ms",
    "ttft_ms",
    "decode_ms",
    "total_ms",
    "prompt_tokens",
    "completion_tokens",
    "decode_tokens_per_s",
}


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path) -> TestClient:
    return await start(aiohttp_client, tmp_path, tiny_model_a)


def sse_events(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def assert_timings(timings: dict[str, Any], usage: dict[str, int]) -> None:
    assert set(timings) == TIMING_KEYS
    assert (timings["prompt_tokens"], timings["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    phases = [timings[k] for k in ("queue_ms", "prefill_ms", "decode_ms")]
    assert min(phases) >= 0 and sum(phases) <= timings["total_ms"] + 0.01
    assert timings["ttft_ms"] == pytest.approx(timings["queue_ms"] + timings["prefill_ms"], abs=0.01)


@pytest.mark.parametrize("path", ["/completion", "/v1/chat/completions"])
async def test_timings_are_opt_in(client: TestClient, path: str) -> None:
    plain = await (await client.post(path, json=CHAT)).json()
    assert "timings" not in plain
    timed = await (await client.post(path, json=CHAT, headers=TIMINGS)).json()
    assert_timings(timed["timings"], timed["usage"])
    off = await (await client.post(path, json=CHAT, headers={"X-Timings": "false"})).json()
    assert "timings" not in off


async def test_timings_come_with_the_last_stream_event(client: TestClient) -> None:
    body = {**CHAT, "stream": True}
    events = sse_events(await (await client.post("/completion", json=body, headers=TIMINGS)).text())
    assert all("timings" not in e for e in events[:-1])
    assert_timings(events[-1]["timings"], events[-1]["usage"])

    openai = {**body, "stream_options": {"include_usage": True}}
    events = sse_events(
        await (await client.post("/v1/chat/completions", json=openai, headers=TIMINGS)).text()
    )
    assert all("timings" not in e for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]  # the usage chunk is the last one
    assert_timings(events[-1]["timings"], events[-1]["usage"])

    untimed = sse_events(await (await client.post("/v1/chat/completions", json=body)).text())
    assert all("timings" not in e for e in untimed)


class SchedulerKilled(BaseException):
    """Escapes the engine's crash barrier: it ends the scheduler thread."""


async def test_a_dead_engine_fails_the_probes_and_refuses_requests(client: TestClient) -> None:
    model = client.app[keys.MANAGER].active.model

    @functools.wraps(model.forward)
    def killed(*args: Any, **kwargs: Any) -> Any:
        raise SchedulerKilled("killed on purpose by the test")

    model.forward = killed
    in_flight = await client.post("/completion", json=CHAT)
    assert_error(in_flight.status, body := await in_flight.json(), 500)
    assert "killed on purpose" in body["error"]["message"]

    for probe in ("/healthz", "/readyz"):
        response = await client.get(probe)
        assert_error(response.status, body := await response.json(), 503)
        assert body["error"]["type"] == "engine_dead" and "killed on purpose" in body["error"]["message"]
    for path in ("/completion", "/v1/chat/completions"):
        response = await client.post(path, json=CHAT)
        assert_error(response.status, body := await response.json(), 503)
        assert body["error"]["type"] == "engine_dead"
        assert "generation engine has stopped" in body["error"]["message"]
    families = text_string_to_metric_families(await (await client.get("/metrics")).text())
    (healthy,) = [f for f in families if f.name == ENGINE_HEALTHY]
    assert [s.value for s in healthy.samples] == [0.0]
