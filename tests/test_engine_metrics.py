"""The engine's request-phase metrics and per-request timings, for a known request mix on a tiny
real model: counts and bucket totals (never durations), and timings that add up."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from service.engine import FinishReason, GenerationResult, SamplingParams
from service.handle import ModelHandle
from service.metrics import (
    E2E_REQUEST_LATENCY_SECONDS,
    ENGINE_HEALTHY,
    ENGINE_STAGES,
    ENGINE_STEP_FAILURES_TOTAL,
    KV_CACHE_TOKENS,
    MAX_RUNNING_REQUESTS,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    REQUEST_DECODE_TIME_SECONDS,
    REQUEST_GENERATION_TOKENS,
    REQUEST_PREFILL_TIME_SECONDS,
    REQUEST_PROMPT_TOKENS,
    REQUEST_QUEUE_TIME_SECONDS,
    ServingMetrics,
)
from tests.test_engine import PROMPTS, consume, ids, load_handle, sample_value
from tests.test_engine_faults import started


@pytest.fixture(scope="module")
def handle(tiny_model_a: Path) -> ModelHandle:
    """Requests on it end only at max_tokens (or cancelled), so token counts are known."""
    loaded = load_handle(tiny_model_a, "tiny-metrics", seed=6)
    return dataclasses.replace(loaded, eos_token_ids=frozenset({-1}))


def assert_timings_add_up(result: GenerationResult) -> None:
    t = result.timings
    assert t is not None
    assert t.submitted_at > 0
    assert min(t.queue_s, t.prefill_s, t.decode_s, t.total_s) >= 0
    assert (t.prompt_tokens, t.completion_tokens) == (
        result.usage.prompt_tokens,
        result.usage.completion_tokens,
    )
    assert t.ttft_s is not None and t.ttft_s == pytest.approx(t.queue_s + t.prefill_s)
    phases = t.queue_s + t.prefill_s + t.decode_s
    assert phases <= t.total_s + 1e-9
    if result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        # It ends in the step of its last token: only that step's bookkeeping is in no phase. (A
        # cancelled request also spends the time until the scheduler notices in none.)
        assert t.total_s - phases <= 0.05 + 0.1 * t.total_s
    if t.completion_tokens >= 2 and t.decode_s > 0:
        assert t.decode_tokens_per_s == pytest.approx((t.completion_tokens - 1) / t.decode_s)
    else:
        assert t.decode_s == 0 and t.decode_tokens_per_s is None


async def test_request_phase_metrics_move_by_the_request_mix(handle: ModelHandle) -> None:
    metrics = ServingMetrics.create(default_collectors=False)

    def value(name: str, **labels: str) -> float:
        return sample_value(metrics, name, **labels)

    async with started(max_running=4, metrics=metrics) as engine:
        assert value(MAX_RUNNING_REQUESTS) == 4 and value(ENGINE_HEALTHY) == 1
        assert value(KV_CACHE_TOKENS) == 0
        prompts = [ids(handle, p) for p in PROMPTS]
        greedy = SamplingParams(max_tokens=5, temperature=0.0)

        endless = engine.submit(handle, prompts[3], SamplingParams(max_tokens=10**6, temperature=0.0))
        it = aiter(endless)
        delivered = [await anext(it), await anext(it)]
        assert value(NUM_REQUESTS_RUNNING) == 1 and value(NUM_REQUESTS_WAITING) == 0
        assert value(KV_CACHE_TOKENS) >= len(prompts[3])  # read at scrape time from the live batch
        finished = await asyncio.gather(
            consume(engine.submit(handle, prompts[0], greedy)),
            consume(engine.submit(handle, prompts[1], greedy)),
            consume(engine.submit(handle, prompts[2], dataclasses.replace(greedy, max_tokens=1))),
        )
        endless.cancel()
        cancelled = await endless.collect()
        assert cancelled.finish_reason is FinishReason.CANCELLED
        results = [r.result for r in finished] + [cancelled]
        assert [r.usage.completion_tokens for r in results[:3]] == [5, 5, 1]
        cancelled_tokens = cancelled.usage.completion_tokens
        assert cancelled_tokens >= len(delivered)

        assert value(REQUEST_QUEUE_TIME_SECONDS + "_count") == 4
        assert value(REQUEST_PREFILL_TIME_SECONDS + "_count") == 4
        assert value(REQUEST_DECODE_TIME_SECONDS + "_count") == 4
        assert value(E2E_REQUEST_LATENCY_SECONDS + "_count", finish_reason="length") == 3
        assert value(E2E_REQUEST_LATENCY_SECONDS + "_count", finish_reason="cancelled") == 1
        assert value(E2E_REQUEST_LATENCY_SECONDS + "_count", finish_reason="error") == 0
        assert value(REQUEST_PROMPT_TOKENS + "_count") == 4
        assert value(REQUEST_PROMPT_TOKENS + "_sum") == sum(len(p) for p in prompts)
        assert value(REQUEST_GENERATION_TOKENS + "_sum") == 11 + cancelled_tokens
        assert value(REQUEST_GENERATION_TOKENS + "_bucket", le="1.0") == 1
        assert value(REQUEST_GENERATION_TOKENS + "_bucket", le="8.0") == 3 + (cancelled_tokens <= 8)
        assert value(REQUEST_GENERATION_TOKENS + "_bucket", le="+Inf") == 4
        assert all(value(ENGINE_STEP_FAILURES_TOTAL, stage=s) == 0 for s in ENGINE_STAGES)
        assert value(NUM_REQUESTS_RUNNING) == 0 and value(KV_CACHE_TOKENS) == 0

        for result in results:
            assert_timings_add_up(result)


async def test_a_request_that_never_ran_has_queue_time_only(handle: ModelHandle) -> None:
    metrics = ServingMetrics.create(default_collectors=False)
    async with started(max_running=1, metrics=metrics) as engine:
        prompt = ids(handle, PROMPTS[0])
        running = engine.submit(handle, prompt, SamplingParams(max_tokens=10**6, temperature=0.0))
        first = await anext(aiter(running))
        queued = engine.submit(handle, prompt, SamplingParams(max_tokens=4))
        queued.cancel()
        result = await queued.collect()
        running.cancel()
        await consume(running, first)

        t = result.timings
        assert result.finish_reason is FinishReason.CANCELLED and t is not None
        assert t.ttft_s is None and t.prefill_s == t.decode_s == 0 and t.completion_tokens == 0
        assert t.queue_s == t.total_s >= 0
        # Only the request that got a slot counts in the queue-time and phase histograms.
        assert sample_value(metrics, REQUEST_QUEUE_TIME_SECONDS + "_count") == 1
        assert sample_value(metrics, REQUEST_PREFILL_TIME_SECONDS + "_count") == 1
        assert sample_value(metrics, E2E_REQUEST_LATENCY_SECONDS + "_count", finish_reason="cancelled") == 2
