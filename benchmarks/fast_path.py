"""The CPU fast path against the bf16 model it stands in for: same answers? how much faster?

``python -m benchmarks.fast_path``. Loads the bundled model twice in this process: as loaded (bf16,
PyTorch's GEMM) and with the GGUF-block kernel serving its linear layers (``service.lifecycle.fast_path``),
which then decodes either through transformers' layers ("block layers") or through the fused decoder
layers ("fused", what the server runs: prefill by the model's forward, decode steps one C call a layer).

- Answers: 20 short questions, 24 greedy tokens each, served path against bf16; how many texts are
  identical, and whether every answer to the France question says Paris. And the served answers when
  the prompts' shared system turn comes from the prefix cache: how many stay the same.
- Step agreement: each question's bf16 answer is fed to the served path one token at a time (teacher
  forcing, so one early difference does not hide the rest); at how many decode steps its greedy pick
  differs, and the bf16 model's own margin between its top two logits at those steps. The kernels
  multiply by the very same weights and only sum in another order, so picks can differ only where
  the two best tokens are within rounding of each other. For scale, the same count for the bf16 model
  and for the served path against float32 arithmetic on the same weights.
- Speed: decode steps per second at batch 1 (median of 5 runs of 64 steps) for each of the three, and
  prefill of the serving benchmark's prompt, as ratios to bf16 from the same run.

Writes benchmarks/results/fast_path.{json,md}.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import inprocess
from benchmarks.common import bundled_model_dir, parser_for, write_results
from service.engine.batch import cache_kwarg

QUESTIONS = [
    "What is the capital of France?",
    "What is 7 times 8?",
    "Name a primary color.",
    "What planet do we live on?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Translate 'thank you' into Spanish.",
    "What is the largest ocean on Earth?",
    "How many days are in a week?",
    "What gas do plants absorb from the air?",
    "Give me a synonym for happy.",
    "What is the opposite of cold?",
    "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?",
    "How many legs does a spider have?",
    "What is the square root of 81?",
    "Name a fruit that is yellow.",
    "What is the freezing point of water in Fahrenheit?",
    "Who painted the Mona Lisa?",
    "What is the tallest mountain in the world?",
]
ANSWER_TOKENS = 24
DECODE_STEPS = 64


def _prompt(tokenizer: Any, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


Decode = Callable[[Any, Any, Any, Any], Any]


def forward_decode(model: Any) -> Decode:
    """A decode step through ``model``'s own forward, called as the fused step is (the batch's layout)."""
    kwarg = cache_kwarg(model)

    def decode(ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, kwarg: cache}
        return model(**inputs).logits[:, -1]

    return decode


def _prefill(model: Any, prompt: list[int]) -> tuple[Any, Any, Any]:
    """The prompt through ``model``'s forward (as the server prefills): its cache, mask, last logits."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    logits = model(input_ids=ids, **{cache_kwarg(model): cache}, logits_to_keep=1).logits[:, -1]
    return cache, torch.ones_like(ids), logits


def _step(decode: Decode, token: int, mask: Any, cache: Any) -> tuple[Any, Any]:
    import torch

    mask = torch.nn.functional.pad(mask, (0, 1), value=1)
    return decode(torch.tensor([[token]]), mask, mask.sum(-1, keepdim=True) - 1, cache), mask


def answers(model: Any, decode: Decode, tokenizer: Any, reused: int = 0) -> list[list[int]]:
    """Each question's ``ANSWER_TOKENS`` greedy tokens: prefill by ``model``, decode steps by ``decode``.
    ``reused``: as the server answers a prompt whose first ``reused`` tokens are in its prefix cache:
    their keys and values from an earlier prefill, the rest of the prompt run on them."""
    import torch

    out = []
    with torch.inference_mode():
        for question in QUESTIONS:
            prompt = _prompt(tokenizer, question)
            cache, mask, logits = _prefill(model, prompt)
            if reused:
                cache.crop(reused - len(prompt))  # keep the first ``reused`` columns
                rest = torch.tensor([prompt[reused:]])
                inputs = {"input_ids": rest, "attention_mask": mask, cache_kwarg(model): cache}
                positions = torch.arange(reused, len(prompt))[None]
                logits = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1]
            tokens = [int(logits[0].argmax())]
            while len(tokens) < ANSWER_TOKENS:
                logits, mask = _step(decode, tokens[-1], mask, cache)
                tokens.append(int(logits[0].argmax()))
            out.append(tokens)
    return out


def step_disagreements(
    reference: tuple[Any, Decode], candidate: tuple[Any, Decode], tokenizer: Any, answers: list[list[int]]
) -> list[float]:
    """Feed each answer to both (model, decode step) pairs one token at a time; for every decode step
    where their greedy picks differ, the reference's margin between its two best logits."""
    import torch

    margins = []
    with torch.inference_mode():
        for question, answer in zip(QUESTIONS, answers, strict=True):
            prompt = _prompt(tokenizer, question)
            (ref_cache, mask, _), (cand_cache, _, _) = (
                _prefill(reference[0], prompt),
                _prefill(candidate[0], prompt),
            )
            for token in answer[:-1]:
                ref, _ = _step(reference[1], token, mask, ref_cache)
                got, mask = _step(candidate[1], token, mask, cand_cache)
                if int(ref[0].argmax()) != int(got[0].argmax()):
                    top = ref[0].float().topk(2).values
                    margins.append(float(top[0] - top[1]))
    return margins


def decode_steps_per_s(model: Any, decode: Decode, prompt: list[int]) -> float:
    """Median over 5 runs of ``DECODE_STEPS`` greedy decode steps at batch 1 after the prompt."""
    import torch

    rates = []
    with torch.inference_mode():
        for _ in range(5):
            cache, mask, logits = _prefill(model, prompt)
            token = int(logits[0].argmax())
            start = time.perf_counter()
            for _ in range(DECODE_STEPS):
                logits, mask = _step(decode, token, mask, cache)
                token = int(logits[0].argmax())
            rates.append(DECODE_STEPS / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(threads: int, cache_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from service.lifecycle import fast_path

    model_dir = bundled_model_dir()
    reference, tokenizer, prompt = inprocess.load(model_dir, threads)
    fast = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    exact = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    report, fused = fast_path.install(fast, model_dir, cache_dir)
    if report.kernel is None or fused is None:
        return {"fast_path": report.reason}
    paths = {
        "bf16": (reference, forward_decode(reference)),
        "block layers": (fast, forward_decode(fast)),
        "fused": (fast, fused),  # what the server runs: block-layer prefill, fused decode steps
    }
    bf16, served = answers(*paths["bf16"], tokenizer), answers(*paths["fused"], tokenizer)
    # The prefix every question's prompt starts with: the chat template's system turn, cached once.
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS]
    shared = next(i for i, tokens in enumerate(zip(*prompts, strict=False)) if len(set(tokens)) > 1)
    after_shared = answers(*paths["fused"], tokenizer, reused=shared)
    margins = step_disagreements(paths["bf16"], paths["fused"], tokenizer, bf16)
    float32 = answers(exact, forward_decode(exact), tokenizer)
    against_float32 = {
        name: len(step_disagreements((exact, forward_decode(exact)), paths[name], tokenizer, float32))
        for name in ("bf16", "fused")
    }
    speed = {name: decode_steps_per_s(model, decode, prompt) for name, (model, decode) in paths.items()}
    prefill = {
        name: inprocess.prefill_seconds(m, prompt) for name, m in (("bf16", reference), ("fast", fast))
    }
    return {
        "threads": threads,
        "layers": report.layers,
        "fused_layers": report.fused_layers,
        "identical_answers": sum(a == b for a, b in zip(bf16, served, strict=True)),
        "shared_prefix_tokens": shared,
        "identical_after_shared_prefix": sum(a == b for a, b in zip(served, after_shared, strict=True)),
        "questions": len(QUESTIONS),
        "france_says_paris": all("Paris" in tokenizer.decode(a[0]) for a in (bf16, served, after_shared)),
        "steps": sum(len(a) - 1 for a in bf16),
        "step_disagreements": len(margins),
        "largest_margin_at_a_disagreement": max(margins, default=0.0),
        "float32_steps": sum(len(a) - 1 for a in float32),
        "step_disagreements_with_float32": against_float32,
        "decode_steps_per_s": speed,
        "prefill_s": prefill,
        "prompt_tokens": len(prompt),
        "ratios": {
            "fused/bf16 decode steps/s (batch 1)": speed["fused"] / speed["bf16"],
            "block layers/bf16 decode steps/s (batch 1)": speed["block layers"] / speed["bf16"],
            "bf16/fast prefill time": prefill["bf16"] / prefill["fast"],
        },
    }


def markdown(result: dict[str, Any]) -> str:
    if "layers" not in result:
        return f"fast path: not measured ({result['fast_path']})\n"
    r = result
    speed, ratios = r["decode_steps_per_s"], r["ratios"]
    lines = [
        f"GGUF-block kernel on {', '.join(f'{n} {fmt}' for fmt, n in r['layers'].items())} linear layers, "
        f"{r['fused_layers']} decoder layers fused at decode, {r['threads']} threads:",
        "",
        "| figure | bf16 (as loaded) | block layers | fused layers (served) | served / bf16 |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| decode steps/s, batch 1 | {speed['bf16']:.1f} | {speed['block layers']:.1f} | "
        f"{speed['fused']:.1f} | {ratios['fused/bf16 decode steps/s (batch 1)']:.2f} |",
        f"| prefill of {r['prompt_tokens']} tokens (ms) | {r['prefill_s']['bf16'] * 1000:.1f} | "
        f"{r['prefill_s']['fast'] * 1000:.1f} | (block layers) | "
        f"{1 / ratios['bf16/fast prefill time']:.2f} |",
        "",
        f"- identical {ANSWER_TOKENS}-token greedy answers, served path against bf16: "
        f"{r['identical_answers']}/{r['questions']}; the France answer says Paris "
        f"in bf16, served, and served after the shared prefix: "
        f"{'yes' if r['france_says_paris'] else 'no'}",
        f"- the {r['shared_prefix_tokens']} tokens every prompt starts with (the system turn) taken from "
        f"an earlier prefill, as the prefix cache does, the rest of the prompt run on them: "
        f"{r['identical_after_shared_prefix']}/{r['questions']} served answers identical to a whole "
        "prefill's (a prompt asked again exactly reuses the first asking's logits: identical)",
        f"- teacher-forced decode steps whose greedy pick differs: {r['step_disagreements']} of "
        f"{r['steps']}; the bf16 model's own top-2 logit margin there is at most "
        f"{r['largest_margin_at_a_disagreement']:.3f}",
        f"- against float32 arithmetic on the same weights (its own answers fed back): the bf16 model's "
        f"pick differs at {r['step_disagreements_with_float32']['bf16']} and the served path's at "
        f"{r['step_disagreements_with_float32']['fused']} of {r['float32_steps']} steps",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = parser_for(__doc__)
    args = parser.parse_args(argv)
    from service.settings import Settings

    result = measure(args.threads, Settings().cache_dir)
    write_results(args.out, "fast_path", result, markdown(result))


if __name__ == "__main__":
    main()
