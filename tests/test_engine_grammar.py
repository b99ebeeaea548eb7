"""Constrained decoding in the engine on a tiny real model: every output of a JSON-schema grammar
validates, masks are per row inside a batch shared with free requests, and a grammar that uses what
llguidance does not implement is refused at compile time, naming the feature."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from service.engine import FinishReason, SamplingParams
from service.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    apply_token_bitmask,
    json_schema_grammar,
    tool_call_grammar,
)
from service.handle import ModelHandle
from tests.test_engine import consume, ids, load_handle
from tests.test_engine_faults import started

#: Nested objects and arrays, enums, bounded strings and integers, required fields.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "role", "age", "address", "tags"],
    "additionalProperties": False,
}
PROMPT = "Describe a user as JSON."


@pytest.fixture(scope="module")
def handle(tiny_model_a: Path) -> ModelHandle:
    return load_handle(tiny_model_a, "tiny-a", seed=1)


def test_apply_token_bitmask_keeps_exactly_the_allowed_tokens() -> None:
    logits = torch.zeros(2, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 1 << 5  # token 5
    bitmask[1, 2] = 1 << 1  # token 65
    apply_token_bitmask(logits, bitmask)
    assert (logits[0] > float("-inf")).nonzero().flatten().tolist() == [5]
    assert (logits[1] > float("-inf")).nonzero().flatten().tolist() == [65]


async def test_json_schema_outputs_validate_for_20_seeds_in_a_mixed_batch(handle: ModelHandle) -> None:
    grammar = GrammarCompiler().compile(handle, json_schema_grammar(SCHEMA))
    constrained = [
        SamplingParams(max_tokens=400, temperature=1.0, seed=seed, grammar=grammar) for seed in range(20)
    ]
    free = [SamplingParams(max_tokens=12, temperature=1.0, seed=seed) for seed in range(4)]
    async with started(max_running=24) as engine:
        prompt = ids(handle, PROMPT)
        streams = [engine.submit(handle, prompt, p) for p in [*constrained, *free]]
        runs = await asyncio.gather(*(consume(s) for s in streams))
    for run in runs[:20]:
        assert run.result.finish_reason is FinishReason.STOP, run.text
        jsonschema.validate(json.loads(run.text), SCHEMA)
    # The free rows were not masked: their text is not JSON (the tiny model writes no JSON by itself).
    for run in runs[20:]:
        assert run.result.finish_reason is FinishReason.LENGTH
        with pytest.raises(ValueError):
            json.loads(run.text)


async def test_forced_tool_call_parses_and_its_arguments_validate(handle: ModelHandle) -> None:
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    grammar = GrammarCompiler().compile(handle, tool_call_grammar([("get_weather", parameters)]))
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=7, grammar=grammar)
    async with started() as engine:
        run = await consume(engine.submit(handle, ids(handle, PROMPT), params))
    assert run.text.startswith("<tool_call>\n") and run.text.endswith("\n</tool_call>")
    call = json.loads(run.text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert call["name"] == "get_weather"
    jsonschema.validate(call["arguments"], parameters)


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "string", "format": "color"}, "color"),
        ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas"),
    ],
)
def test_unsupported_schema_features_are_named(
    handle: ModelHandle, schema: dict[str, Any], named: str
) -> None:
    with pytest.raises(GrammarError, match=named):
        GrammarCompiler().compile(handle, json_schema_grammar(schema))


def test_compiled_grammars_are_cached_per_handle(handle: ModelHandle) -> None:
    compiler = GrammarCompiler(cache_size=1)
    first = compiler.compile(handle, json_schema_grammar(SCHEMA))
    assert compiler.compile(handle, json_schema_grammar(SCHEMA)) is first
    compiler.compile(handle, json_schema_grammar(None))  # evicts the first (cache of one)
    assert compiler.compile(handle, json_schema_grammar(SCHEMA)) is not first
