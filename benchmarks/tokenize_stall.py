"""Do running streams stall while a huge prompt is admitted? And: per-thread tokenizer copies vs a lock.

``python -m benchmarks.tokenize_stall [--url URL]``. Four streams generate on the bundled model;
once each has its first tokens, a ~1 MiB prompt is posted (over the prompt-token limit, so it is
refused with 413, but only after it was rendered and tokenized). Reported: the longest gap between
two tokens of any stream while that prompt was being admitted, next to the longest gap otherwise.
With ``--url`` it measures a server already running (e.g. an older build, for a before/after).

Then the choice behind ``ModelHandle.encode_chat``: tokenizing 8 prompts of 128 KiB on 2 threads
with one tokenizer copy behind a lock vs one copy per thread, and what a copy costs.
Writes benchmarks/results/tokenize_stall.{json,md}.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks import servers
from benchmarks.common import (
    MESSAGES,
    bundled_model_dir,
    parser_for,
    percentile,
    write_results,
)

STREAMS = 4
STREAM_TOKENS = 96
#: Content of the huge prompt, split into messages under the per-message limit (the body stays under 1 MiB).
BIG_PROMPT_CHARS = 1_000_000
MESSAGE_CHARS = 160_000


def words_text(chars: int, seed: int = 0) -> str:
    """``chars`` characters of random lowercase words (realistic work for a BPE tokenizer)."""
    rng = random.Random(seed)
    vocabulary = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)
    ]
    text = " ".join(rng.choices(vocabulary, k=chars // 5))
    return text[:chars]


def big_prompt_messages() -> list[dict[str, str]]:
    text = words_text(BIG_PROMPT_CHARS)
    return [
        {"role": "user", "content": text[i : i + MESSAGE_CHARS]} for i in range(0, len(text), MESSAGE_CHARS)
    ]


async def _stream(
    session: aiohttp.ClientSession, url: str, arrivals: list[float], started: asyncio.Event
) -> None:
    body = {"messages": MESSAGES, "max_tokens": STREAM_TOKENS, "temperature": 0, "stream": True}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
                if len(arrivals) >= 8:
                    started.set()


async def one_round(url: str, big_body: bytes) -> dict[str, Any]:
    """Four streams, the big prompt posted once all run: the longest token gaps during and outside it."""
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
    started = [asyncio.Event() for _ in range(STREAMS)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        streams = [
            asyncio.create_task(_stream(session, url, a, e)) for a, e in zip(arrivals, started, strict=True)
        ]
        await asyncio.gather(*(e.wait() for e in started))
        sent = time.perf_counter()
        async with session.post(
            f"{url}/v1/chat/completions", data=big_body, headers={"Content-Type": "application/json"}
        ) as response:
            status = response.status
            await response.read()
        answered = time.perf_counter()
        await asyncio.gather(*streams)
    during, outside = [0.0], [0.0]
    for times in arrivals:
        for before, after in itertools.pairwise(times):
            (during if after > sent and before < answered else outside).append(after - before)
    return {
        "big_prompt_status": status,
        "big_prompt_s": answered - sent,
        "max_gap_during_s": max(during),
        "max_gap_outside_s": max(outside),
        "p50_gap_outside_s": percentile(outside[1:], 50),
    }


def stall(url: str, rounds: int) -> dict[str, Any]:
    big_body = json.dumps({"messages": big_prompt_messages(), "max_tokens": 1}).encode()
    results = []
    for i in range(rounds):
        results.append(asyncio.run(one_round(url, big_body)))
        r = results[-1]
        print(
            f"  round {i + 1}: big prompt {r['big_prompt_status']} after {r['big_prompt_s']:.2f}s; "
            f"longest token gap during it {r['max_gap_during_s']:.3f}s, "
            f"otherwise {r['max_gap_outside_s']:.3f}s",
            flush=True,
        )
    return {
        "body_bytes": len(big_body),
        "rounds": results,
        "max_gap_during_s": percentile([r["max_gap_during_s"] for r in results], 50),
        "max_gap_outside_s": percentile([r["max_gap_outside_s"] for r in results], 50),
    }


def tokenizer_sharing(
    model_dir: Path, threads: int = 2, prompts: int = 8, repeats: int = 3
) -> dict[str, float]:
    """Seconds to tokenize ``prompts`` chat prompts of 128 KiB on ``threads`` threads: one copy
    behind a lock vs a copy per thread (best of ``repeats``); and one copy's time and memory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = [[{"role": "user", "content": words_text(128 * 1024, seed)}] for seed in range(prompts)]
    process = psutil.Process()
    rss, start = process.memory_info().rss, time.perf_counter()
    shared = copy.deepcopy(tokenizer)
    copy_s, copy_mib = time.perf_counter() - start, (process.memory_info().rss - rss) / 2**20
    lock, local = threading.Lock(), threading.local()

    def locked(messages: list[dict[str, str]]) -> Any:
        with lock:
            return shared.apply_chat_template(messages, add_generation_prompt=True)

    def per_thread(messages: list[dict[str, str]]) -> Any:
        if not hasattr(local, "tokenizer"):
            local.tokenizer = copy.deepcopy(tokenizer)
        return local.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    timings = {"lock_s": float("inf"), "per_thread_copies_s": float("inf")}
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(per_thread, batches[:threads]))  # make the copies first: a cost paid once
        for _ in range(repeats):  # interleaved, so that a change in the machine's load hits both
            for name, render in (("lock_s", locked), ("per_thread_copies_s", per_thread)):
                start = time.perf_counter()
                list(pool.map(render, batches))
                timings[name] = min(timings[name], time.perf_counter() - start)
    return {**timings, "copy_s": copy_s, "copy_mib": copy_mib}


def main(argv: list[str] | None = None) -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    model_dir = bundled_model_dir()
    print(f"{STREAMS} streams while a ~1 MiB prompt is admitted", flush=True)
    if args.url:
        summary = stall(args.url, args.rounds)
    else:
        with tempfile.TemporaryDirectory() as state_dir:
            port = servers.free_port()
            argv_ours = servers.our_server_argv(port, Path(state_dir), str(model_dir), args.threads)
            with servers.server("stall", argv_ours, servers.our_server_ready, port) as (url, _):
                summary = stall(url, args.rounds)
    print("tokenizer shared between threads: one copy behind a lock vs a copy per thread", flush=True)
    summary["tokenizer_sharing"] = sharing = tokenizer_sharing(model_dir)
    text = (
        "| figure | value |\n| --- | ---: |\n"
        f"| longest token gap of {STREAMS} streams while a {summary['body_bytes'] / 2**20:.2f} MiB prompt is "
        f"admitted (median of {args.rounds} rounds) | {summary['max_gap_during_s']:.3f} s |\n"
        f"| longest token gap otherwise | {summary['max_gap_outside_s']:.3f} s |\n"
        f"| 8 prompts of 128 KiB on 2 threads, one tokenizer behind a lock | {sharing['lock_s']:.3f} s |\n"
        f"| the same, a tokenizer copy per thread | {sharing['per_thread_copies_s']:.3f} s |\n"
        f"| one tokenizer copy | {sharing['copy_s']:.3f} s, {sharing['copy_mib']:.1f} MiB |\n"
    )
    write_results(args.out, "tokenize_stall", summary, text)


if __name__ == "__main__":
    main()
