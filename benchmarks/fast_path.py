"""The CPU fast path against the bf16 model it stands in for: same answers? how much faster?

``python -m benchmarks.fast_path``. Loads the bundled model twice in this process: as loaded (bf16,
PyTorch's GEMM) and with the GGUF-block kernel serving its linear layers (``service.lifecycle.fast_path``).

- Answers: 20 short questions, 24 greedy tokens each; how many texts are identical, and whether every
  answer to the France question says Paris.
- Step agreement: each question's bf16 answer is fed to the fast model one token at a time (teacher
  forcing, so one early difference does not hide the rest); at how many decode steps its greedy pick
  differs, and the bf16 model's own margin between its top two logits at those steps. The kernel
  multiplies by the very same weights and only sums in another order, so picks can differ only where
  the two best tokens are within rounding of each other. For scale, the same count for the bf16 model
  and for the fast path against float32 arithmetic on the same weights.
- Speed: decode steps per second at batch 1 (median of 5 runs of 64 steps) and prefill of the
  serving benchmark's prompt, each as fast / bf16 from the same run.

Writes benchmarks/results/fast_path.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import inprocess
from benchmarks.common import RESULTS_DIR, bundled_model_dir, num_threads
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


def answers(model: Any, tokenizer: Any) -> list[list[int]]:
    import torch

    out = []
    with torch.inference_mode():
        for question in QUESTIONS:
            ids = torch.tensor([_prompt(tokenizer, question)])
            generated = model.generate(ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)
            out.append(generated[0, ids.shape[1] :].tolist())
    return out


def step_disagreements(reference: Any, fast: Any, tokenizer: Any, answers: list[list[int]]) -> list[float]:
    """Feed each answer to both models one token at a time; for every step where their greedy picks
    differ, the reference's margin between its two best logits."""
    import torch
    from transformers import DynamicCache

    margins = []
    with torch.inference_mode():
        for question, answer in zip(QUESTIONS, answers, strict=True):
            caches = [DynamicCache(config=reference.config), DynamicCache(config=fast.config)]
            step = torch.tensor([_prompt(tokenizer, question)])
            for token in answer:
                ref, got = (
                    m(input_ids=step, **{cache_kwarg(m): c}, use_cache=True, logits_to_keep=1).logits[0, -1]
                    for m, c in zip((reference, fast), caches, strict=True)
                )
                if int(ref.argmax()) != int(got.argmax()):
                    top = ref.float().topk(2).values
                    margins.append(float(top[0] - top[1]))
                step = torch.tensor([[token]])
    return margins


def decode_steps_per_s(model: Any, prompt: list[int]) -> float:
    import torch
    from transformers import DynamicCache

    rates = []
    with torch.inference_mode():
        for _ in range(5):
            cache = {cache_kwarg(model): DynamicCache(config=model.config)}
            logits = model(input_ids=torch.tensor([prompt]), **cache, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(DECODE_STEPS):
                token = model(input_ids=token, **cache).logits[:, -1].argmax(-1, keepdim=True)
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
    report = fast_path.install(fast, model_dir, cache_dir)
    if report.kernel is None:
        return {"fast_path": report.reason}
    bf16, q4 = answers(reference, tokenizer), answers(fast, tokenizer)
    margins = step_disagreements(reference, fast, tokenizer, bf16)
    float32 = answers(exact, tokenizer)
    models = (("bf16", reference), ("fast", fast))
    against_float32 = {name: len(step_disagreements(exact, m, tokenizer, float32)) for name, m in models}
    speed = {name: decode_steps_per_s(m, prompt) for name, m in models}
    prefill = {name: inprocess.prefill_seconds(m, prompt) for name, m in models}
    return {
        "threads": threads,
        "layers": report.layers,
        "identical_answers": sum(a == b for a, b in zip(bf16, q4, strict=True)),
        "questions": len(QUESTIONS),
        "france_says_paris": all("Paris" in tokenizer.decode(a[0]) for a in (bf16, q4)),
        "steps": sum(len(a) for a in bf16),
        "step_disagreements": len(margins),
        "largest_margin_at_a_disagreement": max(margins, default=0.0),
        "float32_steps": sum(len(a) for a in float32),
        "step_disagreements_with_float32": against_float32,
        "decode_steps_per_s": speed,
        "prefill_s": prefill,
        "prompt_tokens": len(prompt),
        "ratios": {
            "fast/bf16 decode steps/s (batch 1)": speed["fast"] / speed["bf16"],
            "bf16/fast prefill time": prefill["bf16"] / prefill["fast"],
        },
    }


def markdown(result: dict[str, Any]) -> str:
    if "layers" not in result:
        return f"fast path: not measured ({result['fast_path']})\n"
    r = result
    lines = [
        f"GGUF-block kernel on {', '.join(f'{n} {fmt}' for fmt, n in r['layers'].items())} linear layers, "
        f"{r['threads']} threads:",
        "",
        "| figure | bf16 (as loaded) | fast path | fast / bf16 |",
        "| --- | ---: | ---: | ---: |",
        f"| decode steps/s, batch 1 | {r['decode_steps_per_s']['bf16']:.1f} | "
        f"{r['decode_steps_per_s']['fast']:.1f} | {r['ratios']['fast/bf16 decode steps/s (batch 1)']:.2f} |",
        f"| prefill of {r['prompt_tokens']} tokens (ms) | {r['prefill_s']['bf16'] * 1000:.1f} | "
        f"{r['prefill_s']['fast'] * 1000:.1f} | {1 / r['ratios']['bf16/fast prefill time']:.2f} |",
        "",
        f"- identical {ANSWER_TOKENS}-token greedy answers: {r['identical_answers']}/{r['questions']}; "
        f"the France answer says Paris on both: {'yes' if r['france_says_paris'] else 'no'}",
        f"- teacher-forced decode steps whose greedy pick differs: {r['step_disagreements']} of "
        f"{r['steps']}; the bf16 model's own top-2 logit margin there is at most "
        f"{r['largest_margin_at_a_disagreement']:.3f}",
        f"- against float32 arithmetic on the same weights (its own answers fed back): the bf16 model's "
        f"pick differs at {r['step_disagreements_with_float32']['bf16']} and the fast path's at "
        f"{r['step_disagreements_with_float32']['fast']} of {r['float32_steps']} steps",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    from service.settings import Settings

    result = measure(args.threads, Settings().cache_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fast_path.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "fast_path.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
