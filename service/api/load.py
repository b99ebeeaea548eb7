"""``GET /status/load``: the load at a glance (tokens/s, running and queued requests, TTFT p95).

The server keeps a short ring of samples of its own counters and histogram buckets (one every
``SAMPLE_INTERVAL_S``) and answers with deltas against them, the way Prometheus' ``rate()`` and
``histogram_quantile()`` would, so the console needs neither a Prometheus server nor its own
parser of the exposition format, and shows the last minutes as soon as it opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import Metric
from prometheus_client.metrics import MetricWrapperBase

from service.api import paths
from service.api.protocol import LoadSummary
from service.metrics import ServingMetrics

SAMPLE_INTERVAL_S = 5.0
#: Tokens/s is a rate over (about) this many seconds: short enough to follow a burst.
RATE_WINDOW_S = 10.0
#: TTFT p95 covers the requests of (about) this many seconds.
LATENCY_WINDOW_S = 300.0

routes = web.RouteTableDef()


@dataclass(frozen=True)
class Sample:
    """Counter values at monotonic time ``at`` (seconds)."""

    at: float
    generation_tokens: float
    ttft_buckets: tuple[tuple[float, float], ...]  # (upper bound s, cumulative count), +Inf last


def _samples(metric: MetricWrapperBase, suffix: str) -> list[Any]:
    families: list[Metric] = list(metric.collect())
    return [s for family in families for s in family.samples if s.name == family.name + suffix]


def _gauge(metric: MetricWrapperBase) -> int:
    return int(sum(s.value for s in _samples(metric, "")))


def take_sample(metrics: ServingMetrics, at: float) -> Sample:
    buckets = [(float(s.labels["le"]), s.value) for s in _samples(metrics.time_to_first_token, "_bucket")]
    return Sample(
        at=at,
        generation_tokens=sum(s.value for s in _samples(metrics.generation_tokens, "_total")),
        ttft_buckets=tuple(sorted(buckets)),
    )


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """``histogram_quantile`` of cumulative ``(upper bound, count)`` buckets; None without observations.

    Linear interpolation inside the bucket that holds the rank; a rank in the +Inf bucket gives the
    highest finite bound, as Prometheus does.
    """
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


class LoadSampler:
    """A ring of :class:`Sample` s covering ``LATENCY_WINDOW_S``, and the summary computed from it."""

    def __init__(
        self, metrics: ServingMetrics, *, max_running: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._metrics = metrics
        self._max_running = max_running
        self._clock = clock
        self._ring: deque[Sample] = deque(maxlen=int(LATENCY_WINDOW_S / SAMPLE_INTERVAL_S) + 1)

    def record(self) -> None:
        self._ring.append(take_sample(self._metrics, self._clock()))

    def _oldest_within(self, now: float, window_s: float) -> Sample | None:
        return next((s for s in self._ring if now - s.at <= window_s + SAMPLE_INTERVAL_S / 2), None)

    def summary(self) -> LoadSummary:
        """The figures now, against the samples of the last ``RATE_WINDOW_S`` / ``LATENCY_WINDOW_S``."""
        now = take_sample(self._metrics, self._clock())
        m = self._metrics
        tokens_per_s = tokens_window_s = ttft_window_s = 0.0
        ttft_p95_s = None
        if (base := self._oldest_within(now.at, RATE_WINDOW_S)) and now.at - base.at >= 1.0:
            tokens_window_s = now.at - base.at
            tokens_per_s = (now.generation_tokens - base.generation_tokens) / tokens_window_s
        if base := self._oldest_within(now.at, LATENCY_WINDOW_S):
            ttft_window_s = now.at - base.at
            delta = [(b, c - c0) for (b, c), (_, c0) in zip(now.ttft_buckets, base.ttft_buckets, strict=True)]
            ttft_p95_s = quantile(0.95, delta)
        return LoadSummary(
            running=_gauge(m.num_requests_running),
            queued=_gauge(m.num_requests_waiting),
            max_running=self._max_running,
            tokens_per_s=round(tokens_per_s, 2),
            tokens_window_s=round(tokens_window_s, 1),
            ttft_p95_s=None if ttft_p95_s is None else round(ttft_p95_s, 4),
            ttft_window_s=round(ttft_window_s, 1),
        )


#: Used by this module only, so its key lives here rather than in ``keys``.
SAMPLER = web.AppKey("load_sampler", LoadSampler)


async def sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sample every ``SAMPLE_INTERVAL_S`` for the application's lifetime."""
    sampler = app[SAMPLER]

    async def run() -> None:
        while True:
            sampler.record()
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    task = asyncio.create_task(run(), name="load-sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@routes.get(paths.STATUS_LOAD)
async def load(request: web.Request) -> web.Response:
    return web.json_response(request.app[SAMPLER].summary().model_dump())
