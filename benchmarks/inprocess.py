"""The roofline: ``model.generate`` on a static batch in this process, and the prefill time alone."""

from __future__ import annotations

import resource
import time
from typing import Any

from benchmarks.common import MESSAGES, NEW_TOKENS, Row


def load(model_dir: Any, threads: int) -> tuple[Any, Any, list[int]]:
    """The bundled model in bf16 with its tokenizer and the benchmark prompt's token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    prompt = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return model, tokenizer, list(prompt)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prefill_seconds(model: Any, prompt: list[int], repeats: int = 5) -> float:
    """Median time of one forward pass over the prompt (the floor of time-to-first-token)."""
    import torch

    ids = torch.tensor([prompt])
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def generate_row(model: Any, prompt: list[int], batch: int, repeats: int = 2) -> Row:
    """Greedy ``generate`` of NEW_TOKENS for ``batch`` copies of the prompt; the best of ``repeats``."""
    import torch

    ids = torch.tensor([prompt] * batch)
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False}
    best = float("inf")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)
            best = min(best, time.perf_counter() - start)
        batch_prefill = prefill_seconds(model, prompt) if batch == 1 else _batch_prefill(model, ids)
    return Row(
        system="in-process generate",
        concurrency=batch,
        tok_s=batch * NEW_TOKENS / best,
        ttft_p50_s=batch_prefill,
        ttft_p95_s=batch_prefill,
        e2e_p95_s=best,
        errors=0,
        peak_rss_mb=peak_rss_mb(),
        requests=batch * repeats,
    )


def _batch_prefill(model: Any, ids: Any) -> float:
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
    return time.perf_counter() - start
