"""The engine's crash barrier, on a real engine and a tiny real model: a fault injected into one
stage of a scheduler step (tokenizer, forward pass, logits and their processors, KV-cache surgery)
ends only the requests it touched, is counted, and the scheduler goes on; one in the prefix cache's
copies ends none; a thread killed on purpose leaves a dead engine that says why and refuses new
work; a stuck thread still cannot hold a request past its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.engine import Engine, EngineDeadError, FinishReason, SamplingParams, sequence
from service.engine.batch import HandleBatch
from service.handle import ModelHandle
from service.metrics import ENGINE_HEALTHY, ENGINE_STEP_FAILURES_TOTAL, ServingMetrics
from tests.test_engine import PROMPTS, Run, consume, ids, load_handle, run_alone, sample_value

TOKENS = SamplingParams(max_tokens=12, temperature=0.0)


class SchedulerKilled(BaseException):
    """Escapes every ``except Exception``: what it takes to end the scheduler thread."""


@pytest.fixture(scope="module")
def handle(tiny_model_a: Path) -> ModelHandle:
    """A model of its own (its forward gets patched) whose requests end only at max_tokens."""
    loaded = load_handle(tiny_model_a, "tiny-faults", seed=5)
    return dataclasses.replace(loaded, eos_token_ids=frozenset({-1}))


@contextlib.asynccontextmanager
async def started(**options: Any) -> AsyncIterator[Engine]:
    """An engine built with ``options``, running for the ``async with`` block."""
    engine = Engine(**options)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics.create(default_collectors=False)


@pytest.fixture
async def engine(metrics: ServingMetrics) -> AsyncIterator[Engine]:
    async with started(max_running=8, max_queued=8, metrics=metrics) as engine:
        yield engine


@pytest.fixture
def patch_forward(handle: ModelHandle) -> Iterator[Callable[[Callable[..., Any]], None]]:
    """Install ``wrapper(original, *args, **kwargs)`` as the model's forward for one test."""
    original = handle.model.forward

    def install(wrapper: Callable[..., Any]) -> None:
        # functools.wraps keeps the signature the engine inspects for its cache keyword.
        handle.model.forward = functools.wraps(original)(functools.partial(wrapper, original))

    yield install
    handle.model.forward = original


def failures(metrics: ServingMetrics, stage: str) -> float:
    return sample_value(metrics, ENGINE_STEP_FAILURES_TOTAL, stage=stage)


async def assert_still_serving(engine: Engine, handle: ModelHandle, reference: Run) -> None:
    """The scheduler thread lives and the next request gets the same answer as before the fault."""
    after = await run_alone(engine, handle, ids(handle, PROMPTS[0]), TOKENS)
    assert after.result.finish_reason is FinishReason.LENGTH
    assert after.token_ids == reference.token_ids
    assert engine.failure is None
    assert engine._thread is not None and engine._thread.is_alive()


LONG = dataclasses.replace(TOKENS, max_tokens=40)


async def sharing_steps(
    engine: Engine,
    handle: ModelHandle,
    first: tuple[list[int], SamplingParams],
    second: tuple[list[int], SamplingParams],
) -> tuple[Run, Run]:
    """Two requests sure to share decode steps: the second joins once the first (row 0) has a token."""
    running = engine.submit(handle, *first)
    delta = await anext(aiter(running))
    joining = engine.submit(handle, *second)
    return await consume(running, delta), await consume(joining)


class FlakyTokenizer:
    """A tokenizer whose ``decode`` raises once (as a fast tokenizer shared between threads can:
    "Already borrowed"), then works."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        if self.armed:
            self.armed = False
            raise RuntimeError("Already borrowed")
        return self._inner.decode(*args, **kwargs)


async def test_a_tokenizer_fault_ends_only_its_request(
    engine: Engine, handle: ModelHandle, metrics: ServingMetrics
) -> None:
    prompts = [ids(handle, p) for p in PROMPTS[:2]]
    alone = [await run_alone(engine, handle, p, TOKENS) for p in prompts]
    flaky = dataclasses.replace(handle, tokenizer=FlakyTokenizer(handle.tokenizer))

    runs = await asyncio.gather(*(consume(engine.submit(flaky, p, TOKENS)) for p in prompts))

    errors = [r for r in runs if r.result.finish_reason is FinishReason.ERROR]
    assert len(errors) == 1 and "Already borrowed" in (errors[0].result.error or "")
    (ok,) = [(r, a) for r, a in zip(runs, alone, strict=True) if r not in errors]
    assert ok[0].token_ids == ok[1].token_ids  # the other request of the batch went on untouched
    assert failures(metrics, "detokenize") == 1
    await assert_still_serving(engine, handle, alone[0])


async def test_a_forward_fault_in_prefill_ends_only_the_new_requests(
    engine: Engine, handle: ModelHandle, metrics: ServingMetrics, patch_forward: Any
) -> None:
    reference = await run_alone(engine, handle, ids(handle, PROMPTS[0]), TOKENS)
    running = engine.submit(handle, ids(handle, PROMPTS[1]), dataclasses.replace(TOKENS, max_tokens=40))
    first = await anext(aiter(running))  # in the batch before the fault

    def fail_once(original: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[1] > 1:  # a prefill (decode feeds one token per row)
            patch_forward(lambda original, *a, **k: original(*a, **k))
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(*args, **kwargs)

    patch_forward(fail_once)
    failed = await run_alone(engine, handle, ids(handle, PROMPTS[2]), TOKENS)
    assert failed.result.finish_reason is FinishReason.ERROR and "illegal memory" in (
        failed.result.error or ""
    )
    assert (await consume(running, first)).result.finish_reason is FinishReason.LENGTH
    assert failures(metrics, "prefill") == 1
    await assert_still_serving(engine, handle, reference)


async def test_a_forward_fault_in_decode_ends_its_batch(
    engine: Engine, handle: ModelHandle, metrics: ServingMetrics, patch_forward: Any
) -> None:
    reference = await run_alone(engine, handle, ids(handle, PROMPTS[0]), TOKENS)

    def fail_a_two_row_decode(original: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape == (2, 1):
            patch_forward(lambda original, *a, **k: original(*a, **k))
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    patch_forward(fail_a_two_row_decode)
    runs = await sharing_steps(
        engine, handle, (ids(handle, PROMPTS[0]), LONG), (ids(handle, PROMPTS[1]), TOKENS)
    )
    # The shared cache may be half-updated when a decode step raises: every row of it ends.
    assert [r.result.finish_reason for r in runs] == [FinishReason.ERROR] * 2
    assert failures(metrics, "decode") == 1
    await assert_still_serving(engine, handle, reference)


async def test_nan_logits_end_only_their_row(
    engine: Engine, handle: ModelHandle, metrics: ServingMetrics, patch_forward: Any
) -> None:
    jobs = [(ids(handle, PROMPTS[0]), LONG), (ids(handle, PROMPTS[1]), TOKENS)]
    alone = [await run_alone(engine, handle, *job) for job in jobs]
    reference = await run_alone(engine, handle, jobs[0][0], TOKENS)
    armed = True

    def nan_in_row_0(original: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal armed
        out = original(*args, **kwargs)
        if armed and out.logits.shape[0] == 2 and kwargs["input_ids"].shape[1] == 1:
            armed = False
            out.logits[0] = float("nan")
        return out

    patch_forward(nan_in_row_0)
    broken, ok = await sharing_steps(engine, handle, *jobs)

    assert not armed
    assert broken.result.finish_reason is FinishReason.ERROR and "NaN" in (broken.result.error or "")
    assert ok.token_ids == alone[1].token_ids  # the other row of the same step went on untouched
    assert failures(metrics, "sample") == 1
    await assert_still_serving(engine, handle, reference)


async def test_a_logits_processor_fault_ends_only_its_row(
    engine: Engine,
    handle: ModelHandle,
    metrics: ServingMetrics,
    patch_forward: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs = [(ids(handle, PROMPTS[0]), dataclasses.replace(LONG, seed=7)), (ids(handle, PROMPTS[1]), TOKENS)]
    alone = [await run_alone(engine, handle, *job) for job in jobs]
    reference = await run_alone(engine, handle, jobs[0][0], TOKENS)
    rows_in_step = 0
    armed = True

    def record_rows(original: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal rows_in_step
        rows_in_step = kwargs["input_ids"].shape[0]
        return original(*args, **kwargs)

    def raise_in_a_shared_step(output_ids: list[int], scores: Any) -> Any:
        nonlocal armed
        if armed and rows_in_step == 2:
            armed = False
            raise RuntimeError("grammar matcher in an unexpected state")
        return scores

    real = sequence.processors_for
    monkeypatch.setattr(
        sequence,
        "processors_for",
        lambda seq: [raise_in_a_shared_step] if seq.params.seed == 7 else real(seq),
    )
    patch_forward(record_rows)
    broken, ok = await sharing_steps(engine, handle, *jobs)

    assert not armed
    assert broken.result.finish_reason is FinishReason.ERROR
    assert "unexpected state" in (broken.result.error or "")
    assert ok.token_ids == alone[1].token_ids  # the other row of the same step went on untouched
    assert failures(metrics, "sample") == 1
    await assert_still_serving(engine, handle, reference)


async def test_a_kv_cache_surgery_fault_ends_the_rows_it_broke(
    engine: Engine, handle: ModelHandle, metrics: ServingMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = await run_alone(engine, handle, ids(handle, PROMPTS[0]), TOKENS)
    surgery = HandleBatch.remove_finished
    armed = True

    def fail_midway(batch: HandleBatch) -> Any:
        nonlocal armed
        if armed and any(s.finished for s in batch.seqs) and not all(s.finished for s in batch.seqs):
            armed = False
            batch._mask = batch._mask[:1]  # half the surgery done, then it raises
            raise RuntimeError("index out of bounds in the cache")
        return surgery(batch)

    monkeypatch.setattr(HandleBatch, "remove_finished", fail_midway)
    short_params = dataclasses.replace(TOKENS, max_tokens=2)
    long, short = await sharing_steps(
        engine, handle, (ids(handle, PROMPTS[2]), LONG), (ids(handle, PROMPTS[1]), short_params)
    )
    assert not armed
    assert short.result.finish_reason is FinishReason.LENGTH  # it had finished: its result stands
    assert long.result.finish_reason is FinishReason.ERROR  # its cache rows were broken
    assert failures(metrics, "cache") == 1
    await assert_still_serving(engine, handle, reference)


async def test_a_killed_scheduler_thread_leaves_a_dead_engine_that_says_why(
    handle: ModelHandle, metrics: ServingMetrics, patch_forward: Any
) -> None:
    async with started(max_running=1, max_queued=4, metrics=metrics) as engine:
        running = engine.submit(
            handle, ids(handle, PROMPTS[0]), dataclasses.replace(TOKENS, max_tokens=10**6)
        )
        first = await anext(aiter(running))
        waiting = engine.submit(handle, ids(handle, PROMPTS[1]), TOKENS)
        assert sample_value(metrics, ENGINE_HEALTHY) == 1

        def kill(original: Any, *args: Any, **kwargs: Any) -> Any:
            raise SchedulerKilled("killed on purpose by the test")

        patch_forward(kill)
        ended = [await consume(running, first), await consume(waiting)]

        assert [r.result.finish_reason for r in ended] == [FinishReason.ERROR] * 2
        assert all("killed on purpose" in (r.result.error or "") for r in ended)
        assert engine.failure == "SchedulerKilled: killed on purpose by the test"
        assert sample_value(metrics, ENGINE_HEALTHY) == 0
        with pytest.raises(EngineDeadError, match="killed on purpose"):
            engine.submit(handle, ids(handle, PROMPTS[0]), TOKENS)
        assert engine.num_running == engine.num_waiting == 0
        assert await engine.drain(timeout_s=5)


async def test_a_stuck_scheduler_still_cannot_hold_a_request_past_its_deadline(
    handle: ModelHandle, patch_forward: Any
) -> None:
    release = threading.Event()
    stuck = threading.Event()

    def hang(original: Any, *args: Any, **kwargs: Any) -> Any:
        stuck.set()
        release.wait(60)  # a forward pass that never returns (a hung device, a deadlock)
        return original(*args, **kwargs)

    patch_forward(hang)
    async with started(request_timeout_s=0.2) as engine:
        try:
            run = await asyncio.wait_for(consume(engine.submit(handle, ids(handle, "hi"), TOKENS)), 30)
            assert stuck.is_set()
            assert run.result.finish_reason is FinishReason.TIMEOUT and run.result.error
            assert run.result.timings is not None
        finally:
            release.set()


async def test_a_prefix_cache_fault_loses_its_entries_and_no_request(
    handle: ModelHandle, metrics: ServingMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying a prompt or a finished sequence into the prefix cache fails (no memory for the copy):
    the requests finish as if nothing happened, the failure is counted, nothing is cached; once the
    copies work again, a repeated prompt is served from the cache."""
    from service.engine.prefix_cache import PrefixCache

    insert = PrefixCache.insert

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("no memory for the prefix cache's copy")

    prompt = ids(handle, PROMPTS[0])
    async with started(max_running=8, max_queued=8, metrics=metrics, prefix_cache_bytes=2**24) as engine:
        monkeypatch.setattr(PrefixCache, "insert", out_of_memory)
        runs = await asyncio.gather(*(run_alone(engine, handle, prompt, TOKENS) for _ in range(2)))
        assert [r.result.finish_reason for r in runs] == [FinishReason.LENGTH] * 2
        assert runs[0].token_ids == runs[1].token_ids
        assert failures(metrics, "prefix_cache") >= 2  # the prompts' copies, then the finished ones'
        assert engine.prefix_cache_held == 0

        monkeypatch.setattr(PrefixCache, "insert", insert)
        await run_alone(engine, handle, prompt, TOKENS)
        again = await run_alone(engine, handle, prompt, TOKENS)
        assert again.result.usage.cached_tokens == len(prompt)
        await assert_still_serving(engine, handle, runs[0])
