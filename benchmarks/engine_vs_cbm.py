"""Our engine against transformers' own ContinuousBatchingManager, in one process, same model.

The figures behind the engine's design choice: ``python -m benchmarks.engine_vs_cbm``.
Both get the same requests at once (the benchmark prompt, NEW_TOKENS greedy tokens each) and
report aggregate completion tok/s and time to first token, best of ``--repeats`` interleaved
runs. The memory column is how far the process's RSS rose above its level before the run (the
manager's paged KV cache, sized from free memory, or the engine's dynamic caches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from benchmarks.common import NEW_TOKENS, RESULTS_DIR, Row, bundled_model_dir, num_threads, percentile
from benchmarks.inprocess import load
from benchmarks.servers import RssSampler


def run_cbm(model: Any, prompt: list[int], concurrency: int) -> Row:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1)
    sampler = RssSampler(os.getpid())
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        _cbm_batch(manager, prompt, 1)  # warm-up
        start = time.perf_counter()
        outputs = _cbm_batch(manager, prompt, concurrency)
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=True)
        added_mb = sampler.stop()
    ttfts = [o.timestamps[0] - o.created_time for o in outputs if o.timestamps]
    e2e = [o.lifespan[1] - o.created_time for o in outputs]
    return Row(
        system="transformers ContinuousBatchingManager",
        concurrency=concurrency,
        tok_s=sum(len(o.generated_tokens) for o in outputs) / elapsed,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        e2e_p95_s=percentile(e2e, 95),
        errors=sum(o.error is not None for o in outputs),
        peak_rss_mb=added_mb,
        requests=concurrency,
    )


def _cbm_batch(manager: Any, prompt: list[int], n: int) -> list[Any]:
    ids = {manager.add_request(prompt, max_new_tokens=NEW_TOKENS, record_timestamps=True) for _ in range(n)}
    outputs = []
    while ids:
        out = manager.get_result(timeout=1)
        if out is not None and out.request_id in ids and out.is_finished():
            ids.discard(out.request_id)
            outputs.append(out)
    return outputs


async def run_engine(handle: Any, prompt: list[int], concurrency: int) -> Row:
    from service.engine import Engine, SamplingParams

    sampler = RssSampler(os.getpid())
    engine = Engine(max_running=16, max_queued=64)
    await engine.start()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)

    async def one() -> tuple[float, float, int]:
        start = time.perf_counter()
        stream = engine.submit(handle, prompt, params)
        first = None
        async for _ in stream:
            first = first or time.perf_counter() - start
        assert stream.result is not None
        return first or 0.0, time.perf_counter() - start, stream.result.usage.completion_tokens

    try:
        await one()  # warm-up
        start = time.perf_counter()
        runs = await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        await engine.stop()
        added_mb = sampler.stop()
    return Row(
        system="our engine (in-process)",
        concurrency=concurrency,
        tok_s=sum(r[2] for r in runs) / elapsed,
        ttft_p50_s=percentile([r[0] for r in runs], 50),
        ttft_p95_s=percentile([r[0] for r in runs], 95),
        e2e_p95_s=percentile([r[1] for r in runs], 95),
        errors=0,
        peak_rss_mb=added_mb,
        requests=concurrency,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=3, help="runs per point; the best is kept")
    args = parser.parse_args(argv)

    from datetime import UTC, datetime

    from service.handle import ModelHandle, ModelInfo

    model_dir = bundled_model_dir()
    model, tokenizer, prompt = load(model_dir, num_threads())
    info = ModelInfo("smollm2", None, "bundled", "bfloat16", "cpu", model.num_parameters(), datetime.now(UTC))
    handle = ModelHandle(info, model, tokenizer, frozenset({tokenizer.eos_token_id}))
    rows = []
    for c in args.concurrency:
        runs: list[Row] = []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both systems alike
            runs += [asyncio.run(run_engine(handle, prompt, c)), run_cbm(model, prompt, c)]
        for system in dict.fromkeys(r.system for r in runs):
            row = max((r for r in runs if r.system == system), key=lambda r: r.tok_s)
            rows.append(row)
            print(
                f"{system:40s} c={c:2d} {row.tok_s:6.1f} tok/s  TTFT p50 {row.ttft_p50_s:.3f}s"
                f"  +{row.peak_rss_mb:.0f} MiB",
                flush=True,
            )
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "engine_vs_cbm.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))


if __name__ == "__main__":
    main()
