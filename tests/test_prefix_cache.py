"""Automatic prefix caching: the cache's matching and eviction, and the engine reusing it on a tiny real
Llama (float32, CPU) with the same tokens as a prefill from scratch; and a prompt that several requests
send at once prefilled once."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch

from service.engine import Engine, SamplingParams
from service.engine.prefix_cache import BLOCK, PrefixCache
from service.handle import ModelHandle
from service.metrics import (
    PREFIX_CACHE_BYTES,
    PREFIX_CACHE_HITS_TOTAL,
    PREFIX_CACHE_QUERIES_TOTAL,
    ServingMetrics,
)
from tests.test_engine import consume, load_handle, sample_value

LAYERS, HEADS, DIM = 2, 2, 4
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}


@pytest.fixture(scope="module")
def handle_a(tiny_model_a) -> ModelHandle:
    return load_handle(tiny_model_a, "tiny-a", seed=1)


def kv(ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values whose column ``t`` holds token ``ids[t]`` (so a slice shows which tokens it has)."""
    column = torch.tensor(ids, dtype=torch.float32)[None, :, None].expand(HEADS, len(ids), DIM)
    return [column + layer for layer in range(LAYERS)], [-column - layer for layer in range(LAYERS)]


def entry_bytes(tokens: int) -> int:
    return 2 * LAYERS * HEADS * tokens * DIM * 4


def test_a_lookup_finds_the_longest_cached_prefix_and_leaves_the_last_token() -> None:
    cache = PrefixCache(capacity_bytes=2**20)
    stored = list(range(100, 140))
    cache.insert(stored, *kv(stored))

    same = cache.lookup(stored)
    assert same is not None and same.length == len(stored) - 1  # no logits kept: the last token runs
    assert same.logits is None
    assert same.keys[1][0, :, 0].tolist() == [t + 1.0 for t in stored[:-1]]
    assert same.values[0][0, :, 0].tolist() == [-float(t) for t in stored[:-1]]

    diverging = [*stored[:21], 7, 8, 9]  # one block and 5 tokens in common
    hit = cache.lookup(diverging)
    assert hit is not None and hit.length == 21
    longer = [*stored, 1, 2, 3]
    assert (hit := cache.lookup(longer)) is not None and hit.length == len(stored)

    assert cache.lookup([99, *stored]) is None  # the first block differs
    assert cache.lookup(stored[: BLOCK - 1]) is None  # less than one block


def test_short_sequences_and_prefixes_of_held_ones_add_nothing() -> None:
    cache = PrefixCache(capacity_bytes=2**20)
    cache.insert(list(range(BLOCK - 1)), *kv(list(range(BLOCK - 1))))
    assert len(cache) == 0

    prompt = list(range(40))
    cache.insert(prompt, *kv(prompt))
    cache.insert(prompt[:20], *kv(prompt[:20]))  # held already, inside the longer one
    assert len(cache) == 1 and cache.nbytes == entry_bytes(40)

    finished = [*prompt, 50, 51, 52]  # the prompt and its completion replace the prompt alone
    cache.insert(finished, *kv(finished))
    assert len(cache) == 1 and cache.nbytes == entry_bytes(len(finished))
    hit = cache.lookup([*finished, 60])
    assert hit is not None and hit.length == len(finished)


def test_a_prefilled_prompts_logits_make_it_a_whole_hit_even_inside_a_longer_entry() -> None:
    cache = PrefixCache(capacity_bytes=2**20)
    prompt = list(range(40))
    logits = torch.arange(8, dtype=torch.float32)
    cache.insert(prompt, *kv(prompt), logits)
    logits.zero_()  # the cache holds its own copy

    hit = cache.lookup(prompt)
    assert hit is not None and hit.length == len(prompt)
    assert hit.logits is not None and hit.logits.tolist() == list(range(8))
    assert cache.nbytes == entry_bytes(40) + 8 * 4

    finished = [*prompt, 50, 51, 52]  # the request's end replaces the entry and keeps the logits
    cache.insert(finished, *kv(finished))
    assert len(cache) == 1 and cache.nbytes == entry_bytes(len(finished)) + 8 * 4
    hit = cache.lookup(prompt)
    assert hit is not None and hit.length == len(prompt) and hit.logits is not None
    # A prompt inside it that was never prefilled whole leaves its last token to compute.
    inside = cache.lookup(finished[:42])
    assert inside is not None and inside.length == 41 and inside.logits is None
    cache.insert(finished[:42], *kv(finished[:42]), torch.ones(8))  # now it was
    inside = cache.lookup(finished[:42])
    assert inside is not None and inside.length == 42 and inside.logits is not None


def test_the_least_recently_used_entries_go_first_and_entries_are_copies() -> None:
    a, b, c = ([n * 1000 + t for t in range(32)] for n in (1, 2, 3))
    cache = PrefixCache(capacity_bytes=2 * entry_bytes(32))
    keys, values = kv(a)
    cache.insert(a, keys, values)
    keys[0].fill_(0.0)  # the caller's tensors may change afterwards: the cache holds its own copy
    cache.insert(b, *kv(b))
    assert cache.lookup(a) is not None  # a is now more recently used than b
    cache.insert(c, *kv(c))

    assert cache.lookup(b) is None
    hit = cache.lookup(a)
    assert hit is not None and hit.keys[0][0, :, 0].tolist() == [float(t) for t in a[:-1]]
    assert cache.lookup(c) is not None
    assert cache.nbytes == 2 * entry_bytes(32)

    cache.insert(list(range(1000)), *kv(list(range(1000))))  # larger than the whole budget
    assert cache.lookup(list(range(1000))) is None and len(cache) == 2


@asynccontextmanager
async def engine_with(prefix_cache_bytes: int) -> AsyncIterator[tuple[Engine, ServingMetrics]]:
    metrics = ServingMetrics.create(default_collectors=False)
    engine = Engine(max_running=8, max_queued=8, metrics=metrics, prefix_cache_bytes=prefix_cache_bytes)
    await engine.start()
    try:
        yield engine, metrics
    finally:
        await engine.stop()


def chat(handle: ModelHandle, *turns: str) -> list[int]:
    """A conversation's prompt: the system turn, then user and assistant turns alternating."""
    roles = ("user", "assistant")
    messages = [SYSTEM, *({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))]
    return handle.encode_chat(messages)


async def test_a_repeated_prompt_runs_no_forward_pass_and_gets_the_same_tokens(
    handle_a: ModelHandle,
) -> None:
    prompt = chat(handle_a, "The capital of France is")
    assert len(prompt) > 2 * BLOCK
    async with engine_with(0) as (cold_engine, _):
        cold = await consume(cold_engine.submit(handle_a, prompt, GREEDY))
    async with engine_with(2**24) as (engine, metrics):
        first = await consume(engine.submit(handle_a, prompt, GREEDY))
        again = await consume(engine.submit(handle_a, prompt, GREEDY))
        held = sample_value(metrics, PREFIX_CACHE_BYTES)

    assert first.result.usage.cached_tokens == 0
    assert again.result.usage.cached_tokens == len(prompt)  # its logits were kept too: no forward pass
    assert first.token_ids == again.token_ids == cold.token_ids
    assert sample_value(metrics, PREFIX_CACHE_QUERIES_TOTAL) == 2 * len(prompt)
    assert sample_value(metrics, PREFIX_CACHE_HITS_TOTAL) == len(prompt)
    assert held > 0


async def test_the_next_turn_of_a_chat_reuses_the_last_answer(handle_a: ModelHandle) -> None:
    """The finished sequence (prompt and completion) stays cached: the next turn resends it."""
    question = "Kubernetes runs containers; Prometheus scrapes metrics; Grafana draws"
    first_prompt = chat(handle_a, question)
    async with engine_with(2**24) as (engine, _):
        answer = await consume(engine.submit(handle_a, first_prompt, GREEDY))
        next_prompt = chat(handle_a, question, answer.text, "Hello!")
        reply = await consume(engine.submit(handle_a, next_prompt, GREEDY))
    async with engine_with(0) as (cold_engine, _):
        cold = await consume(cold_engine.submit(handle_a, next_prompt, GREEDY))

    assert next_prompt[: len(first_prompt)] == first_prompt
    assert reply.result.usage.cached_tokens > len(first_prompt)  # the prompt and some of the answer
    assert reply.token_ids == cold.token_ids


async def test_cached_and_fresh_prompts_prefilled_together_match_each_alone(handle_a: ModelHandle) -> None:
    """One step prefills a cached prompt (its rest, on the cached keys) and fresh ones (left-padded
    together), one of them with two choices: every row gets the tokens it gets alone, uncached."""
    prompts = [chat(handle_a, q) for q in ("The capital of France is", "Hello!", "the quick brown fox")]
    async with engine_with(0) as (cold_engine, _):
        alone = [(await consume(cold_engine.submit(handle_a, p, GREEDY))).token_ids for p in prompts]
    async with engine_with(2**24) as (engine, _):
        await consume(engine.submit(handle_a, prompts[0], GREEDY))
        streams = [
            engine.submit(handle_a, prompts[0], GREEDY),
            *engine.submit_choices(handle_a, prompts[1], GREEDY, 2),
            engine.submit(handle_a, prompts[2], GREEDY),
        ]
        runs = await asyncio.gather(*(consume(s) for s in streams))
    assert [r.token_ids for r in runs] == [alone[0], alone[1], alone[1], alone[2]]
    assert runs[0].result.usage.cached_tokens == len(prompts[0])


async def test_cached_prompts_of_other_lengths_share_one_forward_pass_and_match_each_alone(
    handle_a: ModelHandle,
) -> None:
    """Whole hits of two lengths, and prompts one token past two finished sequences, submitted together
    (one step admits them all, as a probe showed in every run: each group's cached keys left-padded to
    one length, one forward pass for the group): every request gets the tokens it gets alone without
    the cache."""
    short, long = chat(handle_a, "Hello!"), chat(handle_a, "Kubernetes runs containers; Grafana draws")
    async with engine_with(2**24) as (engine, _):
        first = [await consume(engine.submit(handle_a, p, GREEDY)) for p in (short, long)]
        extended = [[*p, run.token_ids[0]] for p, run in zip((short, long), first, strict=True)]
        prompts = [short, long, *extended]
        runs = await asyncio.gather(*(consume(engine.submit(handle_a, p, GREEDY)) for p in prompts))
    async with engine_with(0) as (cold_engine, _):
        alone = [(await consume(cold_engine.submit(handle_a, p, GREEDY))).token_ids for p in prompts]
    assert [r.token_ids for r in runs] == alone
    assert [r.result.usage.cached_tokens for r in runs] == [len(p) for p in (short, long, short, long)]


def test_requests_with_the_same_prompt_in_one_prefill_run_it_once(handle_a: ModelHandle) -> None:
    """Three requests with one text (three prompt lists) and another, prefilled together: the forward
    pass has two rows, and every sequence gets the logits and KV row of its prompt."""
    from service.engine.model_runner import ModelRunner
    from service.engine.sequence import Sequence
    from service.engine.stream import GenerationStream

    texts = ["The capital of France is"] * 3 + ["Hello!"]
    seqs = [
        Sequence(str(i), handle_a, chat(handle_a, t), GREEDY, GenerationStream(str(i), print), 0.0, 1e9)
        for i, t in enumerate(texts)
    ]
    rows = []
    forward = handle_a.model.forward

    @functools.wraps(forward)  # keeps the signature the batch inspects for its cache keyword
    def counting(*args: Any, **kwargs: Any) -> Any:
        rows.append(len(kwargs["input_ids"]))
        return forward(*args, **kwargs)

    runner = ModelRunner()
    handle_a.model.forward = counting
    try:
        for seq in seqs:
            runner.admit(handle_a, seq)
        with torch.inference_mode():
            logits = runner.prefill(handle_a, seqs)
    finally:
        handle_a.model.forward = forward
    assert rows == [2]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    assert not torch.equal(logits[0], logits[3])
    assert runner.cache_tokens == 4 * len(seqs[0].prompt_ids)  # four rows, padded to the longest


async def test_prompt_logprobs_run_the_whole_prompt(handle_a: ModelHandle) -> None:
    prompt = chat(handle_a, "The capital of France is")
    scored = dataclasses.replace(GREEDY, prompt_logprobs=1)
    async with engine_with(2**24) as (engine, _):
        await consume(engine.submit(handle_a, prompt, GREEDY))
        run = await consume(engine.submit(handle_a, prompt, scored))
    assert run.result.usage.cached_tokens == 0
    assert run.result.prompt_logprobs is not None and len(run.result.prompt_logprobs) == len(prompt)


async def test_with_prefix_caching_off_nothing_is_cached_or_counted(handle_a: ModelHandle) -> None:
    prompt = chat(handle_a, "Hello!")
    async with engine_with(0) as (engine, metrics):
        runs = [await consume(engine.submit(handle_a, prompt, GREEDY)) for _ in range(2)]
    assert [r.result.usage.cached_tokens for r in runs] == [0, 0]
    assert sample_value(metrics, PREFIX_CACHE_QUERIES_TOTAL) == 0


async def test_a_models_prefix_cache_goes_with_it(tiny_model_b) -> None:
    """The cache of a model handle no request holds any more is freed (a swapped-out model's KV)."""
    import gc

    handle = load_handle(tiny_model_b, "tiny-b-gone", seed=3)
    prompt = chat(handle, "Hello!")
    async with engine_with(2**24) as (engine, metrics):
        await consume(engine.submit(handle, prompt, GREEDY))
        assert sample_value(metrics, PREFIX_CACHE_BYTES) > 0
        del handle
        for _ in range(500):
            gc.collect()
            if sample_value(metrics, PREFIX_CACHE_BYTES) == 0:
                break
            await asyncio.sleep(0.01)
        assert sample_value(metrics, PREFIX_CACHE_BYTES) == 0


@pytest.mark.parametrize("bad", ["not a number", -1])
def test_the_setting_refuses_what_is_not_a_size(bad: object) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="prefix_cache_mb"):
        Settings(prefix_cache_mb=bad)
