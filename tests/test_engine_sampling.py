"""Per-request sampling features of the engine on a tiny real model: logits processors (logit_bias,
penalties), logprobs, n choices of one prompt."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from service.engine import QueueFullError, SamplingParams
from service.handle import ModelHandle
from service.metrics import PROMPT_TOKENS_TOTAL, ServingMetrics
from tests.test_engine import GREEDY, consume, ids, load_handle, sample_value
from tests.test_engine_faults import started


@pytest.fixture(scope="module")
def handle(tiny_model_a: Path) -> ModelHandle:
    return load_handle(tiny_model_a, "tiny-a", seed=1)


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics.create(default_collectors=False)


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


def reference_logprobs(handle: ModelHandle, tokens: list[int]) -> torch.Tensor:
    """log-softmax of a direct forward pass of the model over ``tokens``: row i scores token i + 1."""
    with torch.inference_mode():
        logits = handle.model(input_ids=torch.tensor([tokens])).logits[0]
    return logits.float().log_softmax(-1)


async def test_logprobs_equal_a_direct_forward_pass(handle: ModelHandle) -> None:
    prompt = ids(handle, PROMPT)
    asked = [
        SamplingParams(max_tokens=8, temperature=1.0, seed=3, logprobs=5, prompt_logprobs=2),
        dataclasses.replace(GREEDY, max_tokens=8),  # a plain row in the same batch
    ]
    async with started(max_running=8) as engine:
        streams = [engine.submit(handle, prompt, p) for p in asked]
        deltas = [d async for d in streams[0]]
        run, plain = streams[0].result, (await consume(streams[1])).result
    assert run is not None and plain.logprobs is None and plain.prompt_logprobs is None
    output = [token for d in deltas for token in d.token_ids]
    assert run.logprobs is not None and [p for d in deltas for p in d.logprobs] == run.logprobs
    reference = reference_logprobs(handle, prompt + output)
    for i, (token, scored) in enumerate(zip(output, run.logprobs, strict=True)):
        row = reference[len(prompt) - 1 + i]
        assert scored.chosen.token_id == token
        assert scored.chosen.logprob == pytest.approx(float(row[token]), abs=1e-3)
        assert scored.chosen.token == handle.tokenizer.decode([token])
        values = [p.logprob for p in scored.top]
        assert len(scored.top) == 5 and values == sorted(values, reverse=True)
        assert [p.token_id for p in scored.top] == row.topk(5).indices.tolist()
        assert values == pytest.approx(row.topk(5).values.tolist(), abs=1e-3)
    assert run.prompt_logprobs is not None and run.prompt_logprobs[0] is None
    assert list(deltas[0].prompt_logprobs) == run.prompt_logprobs  # streamed with the first token
    assert len(run.prompt_logprobs) == len(prompt)
    for i, scored in enumerate(run.prompt_logprobs[1:]):
        assert scored is not None and scored.chosen.token_id == prompt[i + 1] and len(scored.top) == 2
        assert scored.chosen.logprob == pytest.approx(float(reference[i, prompt[i + 1]]), abs=1e-3)


async def test_n_choices_share_one_prefill_and_sample_independently(
    handle: ModelHandle, metrics: ServingMetrics
) -> None:
    prompt = ids(handle, PROMPT)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=11)

    async def choices() -> list[list[int]]:
        streams = engine.submit_choices(handle, prompt, params, 3)
        return [(await consume(stream)).token_ids for stream in streams]

    async with started(max_running=4, max_queued=0, metrics=metrics) as engine:
        first = await choices()
        prefilled = sample_value(metrics, PROMPT_TOKENS_TOTAL, model_id="tiny-a")
        second = await choices()
        taken = engine.submit_choices(handle, prompt, params, 3)
        with pytest.raises(QueueFullError):  # 3 of 4 slots taken, no queue: 2 more choices do not fit
            engine.submit_choices(handle, prompt, params, 2)
        third = [(await consume(stream)).token_ids for stream in taken]
        alone = [
            (await consume(engine.submit(handle, prompt, dataclasses.replace(params, seed=11 + i)))).token_ids
            for i in range(3)
        ]
    assert prefilled == len(prompt)  # one prefill of the prompt for three choices
    assert first == second == third == alone  # choice i samples with seed + i, in a batch or alone
    assert len({tuple(c) for c in first}) == 3
