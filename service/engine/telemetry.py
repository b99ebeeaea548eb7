"""Where the engine reports what it does: a metrics sink with a null default.

The engine's rooms call the sink unconditionally; :class:`EngineMetrics` discards everything (an
engine built without metrics, e.g. in a benchmark), :class:`PrometheusEngineMetrics` records into
:class:`~service.metrics.ServingMetrics`. Gauges of the engine's state (running, waiting, KV-cache
tokens, slots, health) are read at scrape time rather than pushed every step.
"""

from __future__ import annotations

from typing import Protocol

from service.engine.types import GenerationResult
from service.metrics import ServingMetrics


class EngineState(Protocol):
    """What the scrape-time gauges read (the :class:`~service.engine.Engine` facade)."""

    max_running: int

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_cache_tokens(self) -> int: ...

    @property
    def prefix_cache_held(self) -> int: ...

    @property
    def failure(self) -> str | None: ...


class EngineMetrics:
    """The null sink: every observation is dropped. Subclasses record them."""

    def watch(self, state: EngineState) -> None:
        """Expose ``state``'s gauges, read at each scrape."""

    def rejected(self, reason: str) -> None:
        """A submission refused (``queue_full``, ``shutting_down``)."""

    def cancelled(self, reason: str) -> None:
        """A request stopped early (``client_disconnected``, ``timeout``)."""

    def admitted(self, queue_s: float) -> None:
        """A request got a batch slot after waiting ``queue_s`` seconds."""

    def prefilled(self, model_id: str, prompt_tokens: int, cached_tokens: int | None) -> None:
        """A prefill of ``prompt_tokens`` tokens succeeded, ``cached_tokens`` of them taken from the
        prefix cache (None: prefix caching is off)."""

    def decoded(self, rows: int) -> None:
        """A decode forward pass over ``rows`` sequences succeeded."""

    def generated(self, model_id: str, tokens: int) -> None:
        """``tokens`` new tokens were sampled in one step."""

    def first_token(self, seconds: float) -> None:
        """A request's first token came ``seconds`` after its submission."""

    def next_token(self, seconds: float) -> None:
        """A token came ``seconds`` after the previous one of its request."""

    def finished(self, result: GenerationResult) -> None:
        """A request ended (its ``timings`` set)."""

    def step_failed(self, stage: str) -> None:
        """A failure was caught in ``stage`` of a scheduler iteration (one of ``ENGINE_STAGES``)."""


class PrometheusEngineMetrics(EngineMetrics):
    """Records into the server's Prometheus metrics."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self._m = metrics

    def watch(self, state: EngineState) -> None:
        m = self._m
        m.num_requests_running.set_function(lambda: state.num_running)
        m.num_requests_waiting.set_function(lambda: state.num_waiting)
        m.kv_cache_tokens.set_function(lambda: state.kv_cache_tokens)
        m.prefix_cache_bytes.set_function(lambda: state.prefix_cache_held)
        m.max_running_requests.set_function(lambda: state.max_running)
        m.engine_healthy.set_function(lambda: float(state.failure is None))

    def rejected(self, reason: str) -> None:
        self._m.requests_rejected.labels(reason).inc()

    def cancelled(self, reason: str) -> None:
        self._m.requests_cancelled.labels(reason).inc()

    def admitted(self, queue_s: float) -> None:
        self._m.request_queue_time.observe(queue_s)

    def prefilled(self, model_id: str, prompt_tokens: int, cached_tokens: int | None) -> None:
        self._m.prompt_tokens.labels(model_id).inc(prompt_tokens)
        if cached_tokens is not None:
            self._m.prefix_cache_queries.inc(prompt_tokens)
            self._m.prefix_cache_hits.inc(cached_tokens)

    def decoded(self, rows: int) -> None:
        self._m.batch_size.observe(rows)

    def generated(self, model_id: str, tokens: int) -> None:
        self._m.generation_tokens.labels(model_id).inc(tokens)

    def first_token(self, seconds: float) -> None:
        self._m.time_to_first_token.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self._m.inter_token_latency.observe(seconds)

    def finished(self, result: GenerationResult) -> None:
        m, t = self._m, result.timings
        m.requests_finished.labels(result.finish_reason.value).inc()
        if t is None:
            return
        m.e2e_request_latency.labels(result.finish_reason.value).observe(t.total_s)
        m.request_prompt_tokens.observe(t.prompt_tokens)
        m.request_generation_tokens.observe(t.completion_tokens)
        if t.ttft_s is not None:
            m.request_prefill_time.observe(t.prefill_s)
            m.request_decode_time.observe(t.decode_s)

    def step_failed(self, stage: str) -> None:
        self._m.engine_step_failures.labels(stage).inc()
