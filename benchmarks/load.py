"""A streaming load generator for any OpenAI-compatible ``/v1/chat/completions`` endpoint."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import aiohttp

from benchmarks.common import MESSAGES, NEW_TOKENS


@dataclass
class Sample:
    """One request as the client saw it."""

    ttft_s: float
    e2e_s: float
    completion_tokens: int
    error: str | None = None


def distinct_messages() -> list[dict[str, str]]:
    """:data:`MESSAGES` behind a system turn that starts with a fresh id: no server can reuse the KV of
    an earlier prompt beyond its first few tokens (a cold prefill, where the fixed prompt is cached)."""
    system = f"Session {uuid.uuid4().hex[:8]}: you are a helpful AI assistant named SmolLM."
    return [{"role": "system", "content": system}, *MESSAGES]


async def stream_one(
    session: aiohttp.ClientSession, base_url: str, model: str | None, distinct: bool = False
) -> Sample:
    """One streaming chat completion of the fixed prompt (``distinct``: of :func:`distinct_messages`);
    times the first content chunk and the end of the stream."""
    body = {
        "messages": distinct_messages() if distinct else MESSAGES,
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    start = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                return Sample(0.0, time.perf_counter() - start, 0, f"HTTP {response.status}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices", []):
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        ttft = ttft if ttft is not None else time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sample(0.0, time.perf_counter() - start, 0, repr(exc))
    end = time.perf_counter() - start
    if ttft is None:
        return Sample(0.0, end, 0, "no content streamed")
    # Servers that ignore include_usage stream about one chunk per token.
    return Sample(ttft, end, usage_tokens if usage_tokens is not None else chunks)


async def run_load(
    base_url: str, model: str | None, concurrency: int, rounds: int, distinct: bool = False
) -> tuple[list[Sample], float]:
    """``concurrency`` clients, each sending ``rounds`` requests in turn (``distinct``: each its own
    prompt); the samples and the wall time."""
    timeout = aiohttp.ClientTimeout(total=600)
    # A new connection per request, for every system alike: llama-server closes idle keep-alive
    # connections, which a pooled client would count as errors.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client() -> list[Sample]:
            return [await stream_one(session, base_url, model, distinct) for _ in range(rounds)]

        await stream_one(session, base_url, model, distinct)  # warm-up, not counted
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return [s for samples in per_client for s in samples], wall
