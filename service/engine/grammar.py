"""Constrained decoding with llguidance: JSON schemas and tool calls as token masks.

Chosen by measurement (``benchmarks/grammar_overhead.py``): llguidance builds a schema's grammar in
about a millisecond (lazily, as the parse goes) where xgrammar takes tens and outlines-core seconds,
and its per-token mask costs about what xgrammar's does (under a millisecond per row here); it covers
JSON Schema widely, names what it does not implement, needs neither torch nor triton, and is
MIT-licensed (vLLM, SGLang and llama.cpp use it).

:class:`GrammarCompiler` (one per engine, any thread) validates a grammar against a model's
tokenizer and keeps the validated ones in a small LRU cache per model handle; the request then
carries the :class:`Grammar` in its ``SamplingParams``. At admission the engine makes the request's
own matcher (:func:`grammar_processor`), a logits processor that advances with each sampled token
and masks every token the grammar does not allow next; EOS is allowed only once the grammar is
complete, and is the only token allowed then.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# llguidance computes masks on a rayon thread pool whose idle workers spin; beside torch's
# intra-op threads they cut batch-1 decode of the bundled model from ~26 to ~8 tok/s on 2 cores
# (benchmarks/grammar_overhead.py). The engine computes one row at a time: one thread loses nothing.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import llguidance  # after the thread setting: rayon reads it when its pool starts
import llguidance.hf
import torch

from service.handle import ModelHandle

_BITS = torch.arange(32, dtype=torch.int32)

#: Compact JSON with the usual separators: a grammar that allows free whitespace lets a small
#: model wander in it until max_tokens.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

#: Hermes-style tool calls (Qwen, SmolLM, Hermes families): the template's own markers.
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
#: The arguments of a function declared without ``parameters``: none.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class GrammarError(ValueError):
    """The schema or grammar cannot be served; the message names the feature (llguidance's words)."""


def bitmask_words(vocab_size: int) -> int:
    """32-bit words in one row of a token bitmask over ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, the logits (``[rows, vocab]``) of the tokens whose bit is 0 in ``bitmask``
    (``[rows, bitmask_words(vocab)]`` int32, bit ``t % 32`` of word ``t // 32`` for token ``t``)."""
    vocab = logits.shape[-1]
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).flatten(-2)[..., :vocab]
    logits.masked_fill_(allowed.to(logits.device) == 0, float("-inf"))


@dataclass(frozen=True, eq=False)
class Grammar:
    """A grammar validated against one model's tokenizer (``source`` in llguidance's format)."""

    tokenizer: llguidance.LLTokenizer
    source: str

    def matcher(self) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, self.source)


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """llguidance source of JSON text valid under ``schema`` (any JSON object for None)."""
    return llguidance.LLMatcher.grammar_from_json_schema(
        {"type": "object"} if schema is None else schema, defaults=_JSON_OPTIONS
    )


def tool_call_grammar(functions: list[tuple[str, dict[str, Any]]]) -> str:
    """llguidance source of one Hermes tool call, ``<tool_call>\\n{"name": ..., "arguments": ...}\\n
    </tool_call>``, to one of ``functions`` (name, JSON Schema of its parameters), whose arguments
    validate against that function's schema."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, parameters in functions
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    lark = (
        f"start: {json.dumps(TOOL_CALL_OPEN + chr(10))} call {json.dumps(chr(10) + TOOL_CALL_CLOSE)}\n"
        f"call: %json {json.dumps({**schema, 'x-guidance': _JSON_OPTIONS})}\n"
    )
    return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarCompiler:
    """Validated grammars per model handle (an LRU of ``cache_size``), and each handle's llguidance
    tokenizer (built once: ~1.5 s for a 49k-token vocabulary). Thread-safe; both are freed with the
    handle."""

    def __init__(self, cache_size: int = 32) -> None:
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._per_handle: weakref.WeakKeyDictionary[
            ModelHandle, tuple[llguidance.LLTokenizer, OrderedDict[str, Grammar]]
        ] = weakref.WeakKeyDictionary()

    def compile(self, handle: ModelHandle, source: str) -> Grammar:
        """The :class:`Grammar` of ``source`` on ``handle``'s tokenizer; raises :class:`GrammarError`
        naming what is not supported. CPU-bound on a miss: call it off the event loop."""
        with self._lock:
            if handle not in self._per_handle:
                self._per_handle[handle] = (_tokenizer(handle), OrderedDict())
            tokenizer, cache = self._per_handle[handle]
            grammar = cache.get(source)
            if grammar is not None:
                cache.move_to_end(source)
                return grammar
        if error := llguidance.LLMatcher.validate_grammar(source, tokenizer):
            raise GrammarError(error)
        grammar = Grammar(tokenizer, source)
        with self._lock:
            cache[source] = grammar
            while len(cache) > self.cache_size:
                cache.popitem(last=False)
        return grammar


def _tokenizer(handle: ModelHandle) -> llguidance.LLTokenizer:
    # Only reads the tokenizer (its vocabulary), as the scheduler thread's decoding does too.
    # The mask must cover the model's logits row, which may be longer than the tokenizer's vocabulary.
    vocab = getattr(handle.model.config, "vocab_size", None) or len(handle.tokenizer)
    eos = sorted(handle.eos_token_ids) or None
    return llguidance.hf.from_tokenizer(handle.tokenizer, n_vocab=vocab, eos_token=eos)


def grammar_processor(grammar: Grammar) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    """A logits processor holding one request's matcher: it consumes the tokens sampled since its
    last call, then masks the row to what the grammar allows next. Raises ValueError if a token
    broke the grammar (only a bug or a stop-string cut can make that happen)."""
    matcher = grammar.matcher()
    bitmask = torch.empty(1, bitmask_words(grammar.tokenizer.vocab_size), dtype=torch.int32)
    consumed = 0

    def constrain(output_ids: list[int], scores: torch.Tensor) -> torch.Tensor:
        nonlocal consumed
        if len(output_ids) > consumed:
            if not matcher.consume_tokens(output_ids[consumed:]):
                raise ValueError(f"the output left its grammar: {matcher.get_error()}")
            consumed = len(output_ids)
        # What ``llguidance.torch.fill_next_token_bitmask`` does; that module is not imported: it
        # imports torch.compile's machinery (+110 MiB resident, +2 s start-up) for a kernel we do not use.
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())
        apply_token_bitmask(scores.unsqueeze(0), bitmask)
        return scores

    return constrain
