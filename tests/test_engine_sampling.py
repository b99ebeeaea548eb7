"""Per-request sampling features of the engine on a tiny real model: logits processors (logit_bias,
penalties)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.engine import SamplingParams
from service.handle import ModelHandle
from tests.test_engine import GREEDY, consume, ids, load_handle
from tests.test_engine_faults import started


@pytest.fixture(scope="module")
def handle(tiny_model_a: Path) -> ModelHandle:
    return load_handle(tiny_model_a, "tiny-a", seed=1)


PROMPT = "The capital of France is"


async def generate(handle: ModelHandle, *params: SamplingParams) -> list[list[int]]:
    """The tokens of each request, all run in one batch."""
    async with started(max_running=8) as engine:
        streams = [engine.submit(handle, ids(handle, PROMPT), p) for p in params]
        return [(await consume(stream)).token_ids for stream in streams]


async def test_logit_bias_forces_and_bans_tokens(handle: ModelHandle) -> None:
    plain = dataclasses.replace(GREEDY, max_tokens=6)
    forced_token = 42
    [greedy, forced] = await generate(
        handle, plain, dataclasses.replace(plain, logit_bias=((forced_token, 100.0),))
    )
    assert forced == [forced_token] * 6
    [banned] = await generate(handle, dataclasses.replace(plain, logit_bias=((greedy[0], -100.0),)))
    assert banned[0] != greedy[0]


async def test_penalties_change_repeated_tokens(handle: ModelHandle) -> None:
    plain = dataclasses.replace(GREEDY, max_tokens=16)
    [greedy, *penalized] = await generate(
        handle,
        plain,
        dataclasses.replace(plain, frequency_penalty=2.0),
        dataclasses.replace(plain, presence_penalty=2.0),
        dataclasses.replace(plain, repetition_penalty=2.0),
    )
    assert len(set(greedy)) < len(greedy), "the fixture's greedy output repeats a token"
    for output in penalized:
        assert output != greedy
        # The first token sees no repeated output yet: only the repetition penalty (over the prompt)
        # may change it.
    assert penalized[0][0] == greedy[0] and penalized[1][0] == greedy[0]
