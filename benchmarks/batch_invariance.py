"""Is greedy decoding reproducible when other requests share the batch? bf16 vs float32, and its cost.

``python -m benchmarks.batch_invariance [--model PATH]``. For each dtype, a server on the model
(the bundled one by default, prefix caching off): each prompt is generated alone at temperature 0
(the reference), then again in several trials while seven other requests (other prompts and
lengths, started just before it) share the batch; a trial counts when its text equals the
reference. Then tokens/s at 1 and 8 concurrent streams (the serving benchmark's load) for each
dtype, and float32's ratio to bf16. Writes benchmarks/results/batch_invariance.{json,md}.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import servers
from benchmarks.common import bundled_model_dir, parser_for, write_results
from benchmarks.load import run_load

DTYPES = ("bfloat16", "float32")
PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences what a Kubernetes pod is.",
    "List three uses of a hammer.",
]
OTHERS = [
    "Write a short story about a robot who learns to paint.",
    "Hi",
    "Give me a recipe for pancakes, step by step, with quantities.",
    "What is 17 times 23?",
    "Describe the water cycle to a ten-year-old in a paragraph.",
    "Translate 'good morning' into French, Spanish and German.",
    "Why is the sky blue? Answer briefly, then in detail.",
]
MAX_TOKENS = 48


async def complete(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        return (await response.json())["choices"][0]["message"]["content"]


async def reproducibility(url: str, trials: int) -> dict[str, Any]:
    """How many greedy texts generated beside other requests equal the same prompt generated alone."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        alone = [await complete(session, url, p, MAX_TOKENS) for p in PROMPTS]
        identical = 0
        for trial in range(trials):
            for prompt, reference in zip(PROMPTS, alone, strict=True):
                # Vary where the prompt joins: the others get a head start of 0, 1, 2... steps' worth.
                others = [asyncio.create_task(complete(session, url, o, 64)) for o in OTHERS]
                await asyncio.sleep(0.05 * trial)
                identical += await complete(session, url, prompt, MAX_TOKENS) == reference
                await asyncio.gather(*others)
    return {"identical": identical, "trials": trials * len(PROMPTS)}


def measure(model: str, dtype: str, threads: int, trials: int) -> dict[str, Any]:
    # Prefix caching off: a repeated prompt would otherwise reuse the KV of its solo run, which measures
    # another thing (benchmarks/fast_path.py counts answers that change when a prompt is asked again).
    extra = ["--dtype", dtype, "--max-running-requests", "16", "--prefix-cache-mb", "0"]
    if Path(model).is_dir():
        extra += ["--model-root", str(Path(model).resolve().parent)]
    with tempfile.TemporaryDirectory() as state_dir:
        port = servers.free_port()
        argv = servers.our_server_argv(port, Path(state_dir), model, threads, *extra)
        with servers.server(f"batch-{dtype}", argv, servers.our_server_ready, port) as (url, _):
            result = asyncio.run(reproducibility(url, trials))
            for c, requests in ((1, 4), (8, 16)):
                samples, wall = asyncio.run(run_load(url, None, c, requests // c))
                result[f"tok_s_c{c}"] = sum(s.completion_tokens for s in samples if s.error is None) / wall
    print(
        f"  {dtype}: greedy identical beside other requests {result['identical']}/{result['trials']}, "
        f"c=1 {result['tok_s_c1']:.1f} tok/s, c=8 {result['tok_s_c8']:.1f} tok/s",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--model", help="model id or local folder (default: the bundled model)")
    parser.add_argument("--trials", type=int, default=3, help="trials per prompt (default: %(default)s)")
    args = parser.parse_args(argv)

    model = args.model or str(bundled_model_dir())
    print(f"greedy reproducibility under batch sharing, {' vs '.join(DTYPES)}", flush=True)
    results = {dtype: measure(model, dtype, args.threads, args.trials) for dtype in DTYPES}
    bf16, fp32 = (results[d] for d in DTYPES)
    ratios = {f"float32/bf16 tok/s c={c}": fp32[f"tok_s_c{c}"] / bf16[f"tok_s_c{c}"] for c in (1, 8)}
    lines = [
        "| dtype | greedy texts identical beside other requests | tok/s c=1 | tok/s c=8 |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {d} | {r['identical']}/{r['trials']} | {r['tok_s_c1']:.1f} | {r['tok_s_c8']:.1f} |"
            for d, r in results.items()
        ),
        "",
        *(f"- {name}: {value:.2f}" for name, value in ratios.items()),
    ]
    summary = {"model": Path(model).name, "results": results, "ratios": ratios}
    write_results(args.out, "batch_invariance", summary, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
