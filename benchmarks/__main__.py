"""``make bench``: the serving benchmark of issue 3, every system in one run on this machine.

In-process ``model.generate`` at batch 1 and 8 (the roofline), our server at each concurrency
(streaming, NEW_TOKENS greedy tokens, fixed prompt), llama.cpp's ``llama-server`` on the bundled
GGUF (built once, benchmarks/llama_cpp.py), and ``transformers serve`` with and without
``--continuous-batching`` when ``transformers[serving]`` is installed. Prints the table and the
targets as ratios, and writes benchmarks/results/serving.{md,json,png}; then the deploy latency
figure (benchmarks/deploy_latency.py), the token gap of running streams while a 1 MiB prompt is
admitted (benchmarks/tokenize_stall.py) and greedy reproducibility under batch sharing, bf16 vs
float32 (benchmarks/batch_invariance.py), the CPU fast path against the bf16 model it stands in for
(benchmarks/fast_path.py), the per-token cost of constrained decoding for each grammar library
installed (benchmarks/grammar_overhead.py), and the RSS after each step of a deployment
(benchmarks/memory.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import (
    batch_invariance,
    deploy_latency,
    fast_path,
    grammar_overhead,
    inprocess,
    llama_cpp,
    memory,
    report,
    servers,
    tokenize_stall,
)
from benchmarks.common import NEW_TOKENS, RESULTS_DIR, Row, bundled_model_dir, num_threads, percentile
from benchmarks.load import run_load
from service.lifecycle.bundled import gguf_path


def measure(
    system: str,
    base_url: str,
    model: str | None,
    sampler: servers.RssSampler,
    c: int,
    rounds: int,
    distinct: bool = False,
) -> Row:
    samples, wall = asyncio.run(run_load(base_url, model, c, rounds, distinct))
    ok = [s for s in samples if s.error is None]
    row = Row(
        system=system,
        concurrency=c,
        tok_s=sum(s.completion_tokens for s in ok) / wall,
        ttft_p50_s=percentile([s.ttft_s for s in ok], 50),
        ttft_p95_s=percentile([s.ttft_s for s in ok], 95),
        e2e_p95_s=percentile([s.e2e_s for s in ok], 95),
        errors=len(samples) - len(ok),
        peak_rss_mb=sampler.peak_bytes / 2**20,
        requests=len(samples),
        prompts="distinct" if distinct else "repeated",
    )
    print(
        f"  {system} c={c} ({row.prompts} prompts): {row.tok_s:.1f} tok/s, TTFT p50 {row.ttft_p50_s:.3f}s, "
        f"p95 {row.ttft_p95_s:.3f}s, errors {row.errors}",
        flush=True,
    )
    return row


def run_system(
    system: str,
    argv: list[str],
    ready: Callable[[str], bool],
    port: int,
    model: str | None,
    concurrency: list[int],
    args: argparse.Namespace,
    rows: list[Row],
) -> None:
    """Start ``system``'s server and add one row per concurrency level to ``rows``, then one of a single
    stream sending distinct prompts (time to first token without any prompt cache)."""
    print(system, flush=True)
    with servers.server(system, argv, ready, port) as (url, sampler):
        for c in concurrency:
            rows.append(measure(system, url, model, sampler, c, rounds_for(c, args.requests)))
        rows.append(measure(system, url, model, sampler, 1, args.requests // 2, distinct=True))


def rounds_for(c: int, requests: int) -> int:
    """Requests per client so that each level sends about ``requests`` in all (at least one each)."""
    return max(1, requests // c)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per level (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=num_threads(), help="torch threads (default: cores)")
    parser.add_argument("--skip-peer", action="store_true", help="leave out transformers serve")
    parser.add_argument("--skip-llama", action="store_true", help="leave out llama-server")
    parser.add_argument("--skip-deploy", action="store_true", help="leave out the deploy latency figure")
    parser.add_argument("--skip-stall", action="store_true", help="leave out the tokenize stall figure")
    parser.add_argument(
        "--skip-batch-invariance",
        action="store_true",
        help="leave out greedy reproducibility, bf16 vs float32",
    )
    parser.add_argument(
        "--skip-grammar", action="store_true", help="leave out the constrained-decoding overhead"
    )
    parser.add_argument(
        "--skip-fast-path", action="store_true", help="leave out the fast path against the bf16 model"
    )
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory by deployment step")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    model_dir = bundled_model_dir()
    rows: list[Row] = []
    notes: list[str] = []

    print("in-process generate (roofline)", flush=True)
    model, tokenizer, prompt = inprocess.load(model_dir, args.threads)
    prefill_s = inprocess.prefill_seconds(model, prompt)
    for batch in (1, 8):
        rows.append(inprocess.generate_row(model, prompt, batch))
        print(f"  generate b={batch}: {rows[-1].tok_s:.1f} tok/s", flush=True)
    del model, tokenizer
    gc.collect()

    with tempfile.TemporaryDirectory() as state_dir:
        port = servers.free_port()
        argv_ours = servers.our_server_argv(
            port, Path(state_dir), "bundled:smollm2-135m-instruct", args.threads
        )
        run_system(report.OURS, argv_ours, servers.our_server_ready, port, None, args.concurrency, args, rows)

    binary = None if args.skip_llama else llama_cpp.ensure_llama_server()
    if binary is None:
        notes.append(f"{report.LLAMA}: not measured (skipped, or it could not be built here)")
    else:
        port = servers.free_port()
        argv_llama = llama_cpp.server_argv(binary, gguf_path(), port, args.threads)
        run_system(report.LLAMA, argv_llama, servers.health_ready, port, None, args.concurrency, args, rows)

    for cb, system in ((False, report.PEER), (True, report.PEER_CB)):
        port = servers.free_port()
        argv_peer = None if args.skip_peer else servers.transformers_serve_argv(port, model_dir, cb)
        if argv_peer is None:
            notes.append(f"{system}: not measured (skipped, or transformers[serving] is not installed)")
            continue
        ready = servers.health_ready
        run_system(system, argv_peer, ready, port, str(model_dir), args.concurrency, args, rows)

    notes.append(
        f"SmolLM2-135M-Instruct on CPU: the in-process rows in bf16, ours on the same bf16 weights served "
        f"from the GGUF's blocks (the fast path, where it applies), {report.LLAMA} on the "
        f"Q4_1 GGUF (-np 8 -c 8192); {args.threads} threads, {NEW_TOKENS} new tokens, "
        f"temperature 0, streaming; in-process prefill of the {len(prompt)}-token prompt: {prefill_s:.3f}s; "
        "in-process TTFT columns show the prefill time; peak RSS is the whole server process tree."
    )
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, threads={args.threads}",
        "prefill_s": prefill_s,
        "prompt_tokens": len(prompt),
        "new_tokens": NEW_TOKENS,
    }
    goals = report.targets(rows, prefill_s)
    print()
    print(report.write(rows, goals, notes, meta, args.out))
    common = ["--threads", str(args.threads), "--out", str(args.out)]
    if not args.skip_deploy:
        print("deploy latency (POST /model to phase ready)", flush=True)
        deploy_latency.main(common)
    if not args.skip_stall:
        tokenize_stall.main(common)
    if not args.skip_batch_invariance:
        batch_invariance.main(common)
    if not args.skip_fast_path:
        print("CPU fast path (GGUF blocks) vs the bf16 model: answers, step agreement, speed", flush=True)
        fast_path.main(common)
    if not args.skip_grammar:
        print("constrained decoding: per-token mask overhead by grammar library", flush=True)
        grammar_overhead.main([])
    if not args.skip_memory:
        print("memory: RSS after each step of deploying the bundled model, in a fresh process", flush=True)
        memory.main(common)


if __name__ == "__main__":
    main()
