"""The generation engine on tiny real Llama models (float32, CPU): batching correctness,
per-request parameters, streaming, backpressure, cancellation, timeouts, model handles."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import weakref
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.engine import (
    Engine,
    EngineStoppedError,
    FinishReason,
    GenerationResult,
    GenerationStream,
    QueueFullError,
    SamplingParams,
    TokenDelta,
)
from service.handle import ModelHandle, ModelInfo
from service.metrics import (
    GENERATION_TOKENS_TOTAL,
    PROMPT_TOKENS_TOTAL,
    REQUESTS_CANCELLED_TOTAL,
    REQUESTS_FINISHED_TOTAL,
    REQUESTS_REJECTED_TOTAL,
    TIME_TO_FIRST_TOKEN_SECONDS,
    ServingMetrics,
)

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = [
    "The capital of France is",
    "Hello!",
    "Kubernetes runs containers; Prometheus scrapes metrics; Grafana draws",
    "the quick brown fox",
]


def load_handle(path: Path, model_id: str, seed: int) -> ModelHandle:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # The fixture's 0.02-std init makes greedy decoding repeat one token whatever the context, which
    # would hide rows leaking into each other; wider random weights give varied, context-driven text.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = ModelInfo(
        model_id=model_id,
        revision=None,
        source="local",
        dtype="float32",
        device=str(model.device),
        parameters=model.num_parameters(),
        loaded_at=datetime.now(UTC),
        path=str(path),
    )
    return ModelHandle(info, model, tokenizer, frozenset({tokenizer.eos_token_id}))


@pytest.fixture(scope="module")
def handle_a(tiny_model_a: Path) -> ModelHandle:
    return load_handle(tiny_model_a, "tiny-a", seed=1)


@pytest.fixture(scope="module")
def handle_b(tiny_model_b: Path) -> ModelHandle:
    return load_handle(tiny_model_b, "tiny-b", seed=2)


@pytest.fixture(scope="module")
def endless(handle_a: ModelHandle) -> ModelHandle:
    """Model A that never ends a request by itself: an unbounded context and an end-of-sequence id
    that never comes, so only cancellation, a timeout or a shutdown can end its requests."""
    return dataclasses.replace(
        handle_a,
        info=dataclasses.replace(handle_a.info, context_length=10**9),
        eos_token_ids=frozenset({-1}),
    )


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics.create(default_collectors=False)


@pytest.fixture
async def engine(metrics: ServingMetrics) -> AsyncIterator[Engine]:
    engine = Engine(
        max_running=16, max_queued=64, request_timeout_s=60.0, metrics=metrics, prefix_cache_bytes=2**26
    )
    await engine.start()
    yield engine
    await engine.stop()


def ids(handle: ModelHandle, text: str) -> list[int]:
    return handle.encode_chat([{"role": "user", "content": text}])


@dataclasses.dataclass
class Run:
    token_ids: list[int]
    text: str
    result: GenerationResult


async def consume(stream: GenerationStream, first: TokenDelta | None = None) -> Run:
    """Iterate a stream to its end (``first``: a delta already taken from it), checking that the
    deltas add up to the result."""
    token_ids: list[int] = list(first.token_ids) if first else []
    text = first.text if first else ""
    async for delta in stream:
        token_ids.extend(delta.token_ids)
        text += delta.text
    result = stream.result
    assert result is not None
    assert text == result.text
    assert len(token_ids) == result.usage.completion_tokens
    return Run(token_ids, text, result)


async def run_alone(engine: Engine, handle: ModelHandle, prompt: list[int], params: SamplingParams) -> Run:
    return await consume(engine.submit(handle, prompt, params))


def sample_value(metrics: ServingMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_concurrent_greedy_output_equals_each_alone(engine: Engine, handle_a: ModelHandle) -> None:
    prompts = [ids(handle_a, p) for p in PROMPTS]
    alone = [await run_alone(engine, handle_a, p, GREEDY) for p in prompts]
    assert any(len(r.token_ids) > 5 for r in alone)

    together = await asyncio.gather(*(consume(engine.submit(handle_a, p, GREEDY)) for p in prompts))
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]


async def test_requests_joining_a_running_batch_match_their_solo_output(
    engine: Engine, handle_a: ModelHandle
) -> None:
    """Late joiners get spliced into a cache of another length: masks and positions must line up."""
    prompts = [ids(handle_a, p) for p in PROMPTS]
    params = SamplingParams(max_tokens=40, temperature=0.0)
    alone = [await run_alone(engine, handle_a, p, params) for p in prompts]

    first = engine.submit(handle_a, prompts[0], params)
    first_delta = await anext(aiter(first))  # the first request is running before the others arrive
    late = [engine.submit(handle_a, p, params) for p in prompts[1:]]
    runs = await asyncio.gather(consume(first, first_delta), *(consume(s) for s in late))
    assert [r.token_ids for r in runs] == [r.token_ids for r in alone]


async def test_per_request_parameters_inside_one_batch(engine: Engine, handle_a: ModelHandle) -> None:
    prompt = ids(handle_a, PROMPTS[0])
    reference = await run_alone(engine, handle_a, prompt, GREEDY)
    stop = reference.text[5:8]
    cut = reference.text.index(stop)
    assert len(stop) == 3 and cut >= 1

    greedy, short, stopped, sampled = await asyncio.gather(
        consume(engine.submit(handle_a, prompt, GREEDY)),
        consume(engine.submit(handle_a, prompt, dataclasses.replace(GREEDY, max_tokens=3))),
        consume(engine.submit(handle_a, prompt, dataclasses.replace(GREEDY, stop=(stop,)))),
        consume(engine.submit(handle_a, prompt, SamplingParams(max_tokens=24, temperature=1.5, seed=7))),
    )
    assert greedy.token_ids == reference.token_ids
    assert short.result.finish_reason == FinishReason.LENGTH
    assert short.token_ids == reference.token_ids[:3]
    assert stopped.result.finish_reason == FinishReason.STOP
    assert stopped.text == reference.text[:cut]
    assert sampled.token_ids != reference.token_ids


async def test_seeded_sampling_is_reproducible_in_a_batch(engine: Engine, handle_a: ModelHandle) -> None:
    prompt = ids(handle_a, PROMPTS[1])
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    first = await run_alone(engine, handle_a, prompt, seeded)
    second = await run_alone(engine, handle_a, prompt, seeded)
    in_batch, *_ = await asyncio.gather(
        consume(engine.submit(handle_a, prompt, seeded)),
        *(consume(engine.submit(handle_a, ids(handle_a, p), GREEDY)) for p in PROMPTS),
        consume(engine.submit(handle_a, prompt, dataclasses.replace(seeded, seed=99))),
    )
    other_seed = await run_alone(engine, handle_a, prompt, dataclasses.replace(seeded, seed=99))
    assert first.token_ids == second.token_ids == in_batch.token_ids
    assert other_seed.token_ids != first.token_ids


async def test_stream_delivers_ordered_deltas_then_the_result(
    engine: Engine, handle_a: ModelHandle, metrics: ServingMetrics
) -> None:
    prompt = ids(handle_a, PROMPTS[2])
    stream = engine.submit(handle_a, prompt, SamplingParams(max_tokens=10, temperature=0.0))
    assert stream.request_id and stream.result is None
    run = await consume(stream)
    assert run.result.usage.prompt_tokens == len(prompt)
    assert run.result.usage.total_tokens == len(prompt) + len(run.token_ids)
    assert run.result.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert await stream.collect() is run.result  # a finished stream just returns its result

    assert sample_value(metrics, REQUESTS_FINISHED_TOTAL, finish_reason=run.result.finish_reason) == 1
    assert sample_value(metrics, PROMPT_TOKENS_TOTAL, model_id="tiny-a") == len(prompt)
    assert sample_value(metrics, GENERATION_TOKENS_TOTAL, model_id="tiny-a") == len(run.token_ids)
    assert sample_value(metrics, TIME_TO_FIRST_TOKEN_SECONDS + "_count") == 1


async def test_the_first_token_is_delivered_before_the_next_decode_step(
    engine: Engine, endless: ModelHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's first token (from its prefill) reaches its stream while the decode step after it is
    still running: here that step waits until the test has the token, so holding it back deadlocks."""
    from service.engine.batch import HandleBatch

    got_first = threading.Event()
    decode = HandleBatch.decode

    def decode_after_first_token(batch: HandleBatch) -> torch.Tensor:
        got_first.wait(timeout=40)  # a guard against hanging the suite, not a measurement
        return decode(batch)

    monkeypatch.setattr(HandleBatch, "decode", decode_after_first_token)
    stream = engine.submit(endless, ids(endless, PROMPTS[0]), SamplingParams(max_tokens=3, temperature=0.0))
    first = await asyncio.wait_for(anext(aiter(stream)), timeout=30)
    assert not got_first.is_set()  # no decode step has finished: it waits for this
    got_first.set()
    run = await consume(stream, first)
    assert len(run.token_ids) == 3


async def test_full_queue_is_refused_at_once(endless: ModelHandle, metrics: ServingMetrics) -> None:
    engine = Engine(max_running=1, max_queued=1, metrics=metrics)
    await engine.start()
    try:
        prompt = ids(endless, PROMPTS[0])
        long = SamplingParams(max_tokens=10**9, temperature=0.0)
        streams = [engine.submit(endless, prompt, long) for _ in range(2)]
        with pytest.raises(QueueFullError) as refused:
            engine.submit(endless, prompt, long)
        assert refused.value.retry_after_s >= 1
        assert sample_value(metrics, REQUESTS_REJECTED_TOTAL, reason="queue_full") == 1
        for stream in streams:
            stream.cancel()
        assert {(await s.collect()).finish_reason for s in streams} == {FinishReason.CANCELLED}
    finally:
        await engine.stop()


async def test_cancelling_frees_the_slot(
    handle_a: ModelHandle, endless: ModelHandle, metrics: ServingMetrics
) -> None:
    engine = Engine(max_running=1, max_queued=0, metrics=metrics)
    await engine.start()
    try:
        prompt = ids(handle_a, PROMPTS[0])
        endless_params = SamplingParams(max_tokens=10**9, temperature=0.0)
        stream = engine.submit(endless, prompt, endless_params)
        await anext(aiter(stream))
        with pytest.raises(QueueFullError):
            engine.submit(handle_a, prompt, GREEDY)
        stream.cancel()
        assert (await stream.collect()).finish_reason == FinishReason.CANCELLED

        # A handler task torn down mid-stream (client disconnect) cancels its request the same way.
        consumer = asyncio.create_task(consume(engine.submit(endless, prompt, endless_params)))
        await asyncio.sleep(0.05)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer

        async def resubmit_when_free() -> Run:
            while True:
                try:
                    return await consume(engine.submit(handle_a, prompt, GREEDY))
                except QueueFullError:
                    await asyncio.sleep(0.01)

        after = await asyncio.wait_for(resubmit_when_free(), 60)
        assert after.result.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        cancelled = sample_value(metrics, REQUESTS_CANCELLED_TOTAL, reason="client_disconnected")
        assert cancelled == 2
    finally:
        await engine.stop()


async def test_request_timeout(endless: ModelHandle, metrics: ServingMetrics) -> None:
    engine = Engine(request_timeout_s=0.5, metrics=metrics)
    await engine.start()
    try:
        run = await consume(engine.submit(endless, ids(endless, "hi"), SamplingParams(max_tokens=10**9)))
        assert run.result.finish_reason == FinishReason.TIMEOUT
        assert run.result.error
        assert sample_value(metrics, REQUESTS_CANCELLED_TOTAL, reason="timeout") == 1
    finally:
        await engine.stop()


async def test_two_handles_at_once_are_never_mixed(
    engine: Engine, handle_a: ModelHandle, handle_b: ModelHandle
) -> None:
    jobs = [(h, ids(h, p)) for p in PROMPTS for h in (handle_a, handle_b)]
    alone = [await run_alone(engine, h, p, GREEDY) for h, p in jobs]
    assert alone[0].token_ids != alone[1].token_ids  # the two models really differ
    together = await asyncio.gather(*(consume(engine.submit(h, p, GREEDY)) for h, p in jobs))
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


async def test_handle_is_released_after_its_last_request(engine: Engine, tiny_model_b: Path) -> None:
    handle = load_handle(tiny_model_b, "tiny-b-old", seed=3)
    handle_ref, model_ref = weakref.ref(handle), weakref.ref(handle.model)
    prompt = ids(handle, PROMPTS[0])
    await asyncio.gather(*(consume(engine.submit(handle, prompt, GREEDY)) for _ in range(3)))
    del handle
    for _ in range(500):  # the scheduler drops its references right after delivering the results
        gc.collect()
        if handle_ref() is None and model_ref() is None:
            break
        await asyncio.sleep(0.01)
    assert handle_ref() is None
    assert model_ref() is None


async def test_a_failing_request_ends_in_error_and_the_engine_keeps_serving(
    engine: Engine, handle_a: ModelHandle
) -> None:
    vocab = handle_a.model.config.vocab_size
    failed = await run_alone(engine, handle_a, [1, vocab + 10], GREEDY)  # out-of-range embedding index
    assert failed.result.finish_reason == FinishReason.ERROR
    assert failed.result.error
    unusable = dataclasses.replace(handle_a, model=None)  # e.g. a handle whose model was torn down
    broken = await run_alone(engine, unusable, ids(handle_a, PROMPTS[0]), GREEDY)
    assert broken.result.finish_reason == FinishReason.ERROR
    ok = await run_alone(engine, handle_a, ids(handle_a, PROMPTS[0]), GREEDY)
    assert ok.result.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)


async def test_drain_finishes_in_flight_requests_and_refuses_new_ones(
    handle_a: ModelHandle, metrics: ServingMetrics
) -> None:
    engine = Engine(metrics=metrics)
    await engine.start()
    prompt = ids(handle_a, PROMPTS[0])
    streams = [engine.submit(handle_a, prompt, GREEDY) for _ in range(3)]
    assert await engine.drain(timeout_s=60)
    with pytest.raises(EngineStoppedError):
        engine.submit(handle_a, prompt, GREEDY)
    assert sample_value(metrics, REQUESTS_REJECTED_TOTAL, reason="shutting_down") == 1
    for stream in streams:
        assert (await stream.collect()).finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert engine.num_running == engine.num_waiting == 0
    await engine.stop()


async def test_stop_cancels_what_is_left(endless: ModelHandle) -> None:
    engine = Engine(max_running=1)
    await engine.start()
    prompt = ids(endless, PROMPTS[0])
    running = engine.submit(endless, prompt, SamplingParams(max_tokens=10**9))
    waiting = engine.submit(endless, prompt, SamplingParams(max_tokens=10**9))
    await anext(aiter(running))
    await engine.stop()
    assert (await running.collect()).finish_reason == FinishReason.CANCELLED
    assert (await waiting.collect()).finish_reason == FinishReason.CANCELLED
