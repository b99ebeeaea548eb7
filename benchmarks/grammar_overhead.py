"""Per-token cost of constrained decoding on this CPU: llguidance vs xgrammar vs outlines-core.

For each installed library: the compile time of a JSON schema with nested objects, arrays and enums
(on the bundled SmolLM2 tokenizer, 49152 tokens), then a decode loop over random logits at batch 1
and 8 where each step computes every row's allowed-token bitmask, applies it to the ``[batch,
vocab]`` logits, samples (temperature 1) and advances each matcher; a matcher that completes starts
over. The same apply and sampling code serve every library (the engine's own), so the columns differ
only by the library's mask and advance. Printed as microseconds per step and as a ratio to the
unconstrained step (sampling alone), and as the added microseconds per row (mask + apply + advance).
Then the server's own engine on the bundled model, in process: tokens/s at 1 and 8 concurrent
requests (temperature 1, seeded), free and constrained to the schema (llguidance, as served).
The machine is shared: each figure is the best of ``--repeat``.

    python -m benchmarks.grammar_overhead [--steps 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import NEW_TOKENS, bundled_model_dir, num_threads
from benchmarks.inprocess import load
from service.engine.grammar import apply_token_bitmask, bitmask_words

#: A schema of the kind clients send: nested objects and arrays, enums, required fields.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}


@dataclass
class Candidate:
    """One library: ``compile(schema) -> grammar``; ``matcher(grammar) -> m``; ``fill(m, bitmask, row)``;
    ``advance(m, token)``; ``done(m) -> bool`` (nothing but EOS may follow)."""

    name: str
    compile: Callable[[dict[str, Any]], Any]
    matcher: Callable[[Any], Any]
    fill: Callable[[Any, torch.Tensor, int], None]
    advance: Callable[[Any, int], None]
    done: Callable[[Any], bool]


def llguidance_candidate(tokenizer: Any, vocab: int) -> Candidate:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile_(schema: dict[str, Any]) -> str:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        llguidance.LLMatcher(lltok, grammar)  # the first matcher is where the grammar gets built
        return grammar

    return Candidate(
        "llguidance",
        compile_,
        lambda g: llguidance.LLMatcher(lltok, g),
        llguidance.torch.fill_next_token_bitmask,
        lambda m, t: m.consume_token(t),
        lambda m: m.is_stopped(),
    )


def xgrammar_candidate(tokenizer: Any, vocab: int) -> Candidate:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)

    def compile_(schema: dict[str, Any]) -> Any:
        # A fresh compiler each time: its cache would turn repeats into look-ups.
        return xgrammar.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(schema))

    return Candidate(
        "xgrammar",
        compile_,
        xgrammar.GrammarMatcher,
        lambda m, bitmask, row: m.fill_next_token_bitmask(bitmask, row),
        lambda m, t: m.accept_token(t),
        lambda m: m.is_completed(),
    )


def outlines_candidate(tokenizer: Any, vocab: int) -> Candidate:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from outlines_core.kernels.torch import fill_next_token_bitmask

    vocabulary = Vocabulary(tokenizer.eos_token_id, _byte_vocabulary(tokenizer))

    return Candidate(
        "outlines-core",
        lambda schema: Index(build_regex_from_schema(json.dumps(schema)), vocabulary),
        Guide,
        lambda guide, bitmask, row: fill_next_token_bitmask(guide, bitmask[row : row + 1]),
        lambda guide, t: guide.advance(t),
        lambda guide: guide.is_finished(),
    )


def _byte_vocabulary(tokenizer: Any) -> dict[bytes, list[int]]:
    """Each normal token's bytes (byte-level BPE spells bytes as printable characters)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decode = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    vocabulary: dict[bytes, list[int]] = {}
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id not in special:
            vocabulary.setdefault(bytes(decode[c] for c in piece), []).append(token_id)
    return vocabulary


CANDIDATES = {
    "llguidance": llguidance_candidate,
    "xgrammar": xgrammar_candidate,
    "outlines-core": outlines_candidate,
}


def sample(logits: torch.Tensor, generator: torch.Generator) -> list[int]:
    return torch.multinomial(logits.float().softmax(-1), 1, generator=generator).flatten().tolist()


def step_loop(batch: int, vocab: int, steps: int, candidate: Candidate | None, grammar: Any) -> float:
    """Seconds per step of ``steps`` masked (or, without a candidate, plain) sampling steps."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(steps, batch, vocab, generator=generator)
    bitmask = torch.zeros(batch, bitmask_words(vocab), dtype=torch.int32)
    matchers = [candidate.matcher(grammar) for _ in range(batch)] if candidate else []
    started = time.perf_counter()
    for step in range(steps):
        logits = rows[step]
        if candidate:
            for row, m in enumerate(matchers):
                candidate.fill(m, bitmask, row)
            apply_token_bitmask(logits, bitmask)
        tokens = sample(logits, generator)
        for row, m in enumerate(matchers):
            candidate.advance(m, tokens[row])
            if candidate.done(m):
                matchers[row] = candidate.matcher(grammar)
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(1)  # the engine samples on its one scheduler thread
    model_dir = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size

    def best(measure: Callable[[], float]) -> float:
        return min(measure() for _ in range(args.repeat))

    plain = {b: best(lambda b=b: step_loop(b, vocab, args.steps, None, None)) for b in (1, 8)}
    print(
        f"unconstrained sampling step: b=1 {plain[1] * 1e6:.0f} us, b=8 {plain[8] * 1e6:.0f} us"
        f" (best of {args.repeat})"
    )
    print(
        f"{'library':<14} {'compile ms':>10} {'b=1 us/step':>12} {'x plain':>8} {'mask us/row':>12}"
        f" {'b=8 us/step':>12} {'x plain':>8} {'mask us/row':>12}"
    )
    for name, build in CANDIDATES.items():
        try:
            candidate = build(tokenizer, vocab)
        except ImportError as exc:
            print(f"{name:<14} not installed ({exc.name})")
            continue
        compile_s = best(lambda c=candidate: _timed(lambda: c.compile(SCHEMA)))
        grammar = candidate.compile(SCHEMA)
        per_step = {
            b: best(lambda b=b, c=candidate, g=grammar: step_loop(b, vocab, args.steps, c, g)) for b in (1, 8)
        }
        cells = "".join(
            f" {per_step[b] * 1e6:>12.0f} {per_step[b] / plain[b]:>8.2f}"
            f" {(per_step[b] - plain[b]) / b * 1e6:>12.0f}"
            for b in (1, 8)
        )
        print(f"{name:<14} {compile_s * 1e3:>10.1f}{cells}", flush=True)
    engine_rows(model_dir, args.repeat)


async def engine_tok_s(
    handle: Any, prompt: list[int], concurrency: int, grammar: Any, rounds: int = 4
) -> float:
    """Decode tokens/s of ``rounds`` waves of ``concurrency`` requests run together by the engine
    (with ``grammar``, if any): tokens after each first one, over each wave's span from its first
    first-token to its last token (answers end at different lengths, so prefill is left out)."""
    from service.engine import Engine, SamplingParams

    engine = Engine(max_running=16, max_queued=64)
    await engine.start()
    tokens, seconds = 0, 0.0
    try:
        for wave in range(rounds):
            params = [
                SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=wave * 100 + i, grammar=grammar)
                for i in range(concurrency)
            ]
            results = await asyncio.gather(*(engine.submit(handle, prompt, p).collect() for p in params))
            timings = [r.timings for r in results if r.timings is not None and r.timings.ttft_s is not None]
            tokens += sum(t.completion_tokens - 1 for t in timings)
            seconds += max(t.submitted_at + t.ttft_s + t.decode_s for t in timings) - min(
                t.submitted_at + t.ttft_s for t in timings
            )
    finally:
        await engine.stop()
    return tokens / seconds


def engine_rows(model_dir: Any, repeat: int) -> None:
    """Print the engine's tokens/s free and constrained, at concurrency 1 and 8."""
    from datetime import UTC, datetime

    from service.engine.grammar import GrammarCompiler, json_schema_grammar
    from service.handle import ModelHandle, ModelInfo

    model, tokenizer, prompt = load(model_dir, num_threads())
    info = ModelInfo("smollm2", None, "bundled", "bfloat16", "cpu", model.num_parameters(), datetime.now(UTC))
    handle = ModelHandle(info, model, tokenizer, frozenset({tokenizer.eos_token_id}))
    grammar = GrammarCompiler().compile(handle, json_schema_grammar(SCHEMA))
    asyncio.run(engine_tok_s(handle, prompt, 1, None))  # warm-up
    for c in (1, 8):
        free, constrained = (
            max(asyncio.run(engine_tok_s(handle, prompt, c, g)) for _ in range(repeat))
            for g in (None, grammar)
        )
        print(
            f"engine c={c}: decode {free:.1f} tok/s free, {constrained:.1f} tok/s constrained"
            f" ({constrained / free:.2f}x)",
            flush=True,
        )


def _timed(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
