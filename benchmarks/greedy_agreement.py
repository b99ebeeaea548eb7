"""Does the fast path answer as the bf16 path does? Greedy answers to 20 short questions, both ways.

``python -m benchmarks.greedy_agreement``: the bundled model loaded twice, once as served without the
fast path (``SERVING_QUANTIZATION=none``) and once with it, each answering every question in one
left-padded greedy batch. Issue 14 asks for at least 18 identical answers, and "Paris" in every
answer to the France question. Writes benchmarks/results/greedy_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, bundled_model_dir, num_threads
from service.lifecycle import fast_path, loader
from service.lifecycle.sources import ModelSource, SourceKind

FRANCE = "What is the capital of France?"
QUESTIONS = [
    FRANCE,
    "What is 2 + 2?",
    "Name a primary color.",
    "What is the opposite of hot?",
    "How many days are in a week?",
    "What do bees make?",
    "What is the largest planet in our solar system?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "What language is spoken in Spain?",
    "What is H2O?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "What is the capital of Japan?",
    "What gas do plants absorb?",
    "What is the square root of 16?",
    "Which animal is known as the king of the jungle?",
    "What is the freezing point of water in Fahrenheit?",
    "Name a fruit that is yellow.",
    "What is the main ingredient of bread?",
]
NEW_TOKENS = 24
NEEDED = 18


def answers(handle: Any) -> list[str]:
    """Greedy answers to QUESTIONS, generated as one left-padded batch."""
    import torch

    prompts = [handle.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    width = max(map(len, prompts))
    pad = handle.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = handle.model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad
        )
    return [handle.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    loader.set_threads(args.threads)

    model_dir = bundled_model_dir()
    source = ModelSource("bundled:smollm2-135m-instruct", SourceKind.BUNDLED)
    eager = answers(loader.load(model_dir, source, device="cpu", dtype="bfloat16"))
    handle = loader.load(model_dir, source, device="cpu", dtype="bfloat16")
    report = fast_path.prepare(handle, "auto")
    fast = answers(handle)

    same = sum(a == b for a, b in zip(eager, fast, strict=True))
    paris = all("Paris" in a for a in (eager[0], fast[0]))
    summary = {
        "fast_path": report.kind if report.enabled else f"off: {report.reason}",
        "identical": same,
        "questions": len(QUESTIONS),
        "met": same >= NEEDED and paris,
        "france": {"bf16": eager[0], "fast": fast[0]},
        "differing": [
            {"question": q, "bf16": a, "fast": b}
            for q, a, b in zip(QUESTIONS, eager, fast, strict=True)
            if a != b
        ],
    }
    lines = [
        f"Greedy answers identical with the fast path ({summary['fast_path']}): {same}/{len(QUESTIONS)} "
        f"(need >= {NEEDED}); France question: bf16 {eager[0]!r}, fast {fast[0]!r}; "
        f"{'met' if summary['met'] else 'not met'}",
        *(f"- {d['question']} bf16 {d['bf16']!r} / fast {d['fast']!r}" for d in summary["differing"]),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "greedy_agreement.json").write_text(json.dumps(summary, indent=2))
    (args.out / "greedy_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return summary


if __name__ == "__main__":
    main()
