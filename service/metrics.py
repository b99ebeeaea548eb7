"""Every Prometheus metric the server exports, defined once.

Dashboards and alert rules import the names from here (``dashboards/``), so a rename breaks
their tests instead of silently emptying a panel. Metrics are registered on an injectable
``CollectorRegistry`` so tests and several apps in one process never collide.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

PREFIX = "serving"

# HTTP layer
HTTP_REQUESTS_TOTAL = f"{PREFIX}_http_requests_total"
HTTP_REQUEST_DURATION_SECONDS = f"{PREFIX}_http_request_duration_seconds"
HTTP_REQUESTS_IN_FLIGHT = f"{PREFIX}_http_requests_in_flight"

# Model lifecycle
MODEL_INFO = f"{PREFIX}_model_info"
MODEL_READY = f"{PREFIX}_model_ready"
DEPLOYMENT_PHASE = f"{PREFIX}_deployment_phase"
DEPLOYMENTS_TOTAL = f"{PREFIX}_deployments_total"
MODEL_LOAD_DURATION_SECONDS = f"{PREFIX}_model_load_duration_seconds"
DEPLOYMENT_PHASE_DURATION_SECONDS = f"{PREFIX}_deployment_phase_duration_seconds"
MODEL_SWAP_DURATION_SECONDS = f"{PREFIX}_model_swap_duration_seconds"
MODEL_DOWNLOAD_BYTES_TOTAL = f"{PREFIX}_model_download_bytes_total"
MODEL_WEIGHTS_BYTES = f"{PREFIX}_model_weights_bytes"
MODELS_RESIDENT = f"{PREFIX}_models_resident"

# Generation engine (named after vLLM's num_requests_running/waiting so operators recognise them)
NUM_REQUESTS_RUNNING = f"{PREFIX}_num_requests_running"
NUM_REQUESTS_WAITING = f"{PREFIX}_num_requests_waiting"
BATCH_SIZE = f"{PREFIX}_batch_size"
PROMPT_TOKENS_TOTAL = f"{PREFIX}_prompt_tokens_total"
GENERATION_TOKENS_TOTAL = f"{PREFIX}_generation_tokens_total"
TIME_TO_FIRST_TOKEN_SECONDS = f"{PREFIX}_time_to_first_token_seconds"
INTER_TOKEN_LATENCY_SECONDS = f"{PREFIX}_inter_token_latency_seconds"
REQUESTS_FINISHED_TOTAL = f"{PREFIX}_requests_finished_total"
REQUESTS_REJECTED_TOTAL = f"{PREFIX}_requests_rejected_total"
REQUESTS_CANCELLED_TOTAL = f"{PREFIX}_requests_cancelled_total"
# Per-request phases, as vLLM's request_queue_time/prefill_time/decode_time/e2e_request_latency.
REQUEST_QUEUE_TIME_SECONDS = f"{PREFIX}_request_queue_time_seconds"
REQUEST_PREFILL_TIME_SECONDS = f"{PREFIX}_request_prefill_time_seconds"
REQUEST_DECODE_TIME_SECONDS = f"{PREFIX}_request_decode_time_seconds"
E2E_REQUEST_LATENCY_SECONDS = f"{PREFIX}_e2e_request_latency_seconds"
REQUEST_PROMPT_TOKENS = f"{PREFIX}_request_prompt_tokens"
REQUEST_GENERATION_TOKENS = f"{PREFIX}_request_generation_tokens"
KV_CACHE_TOKENS = f"{PREFIX}_kv_cache_tokens"
# Automatic prefix caching, in tokens as vLLM's prefix_cache_queries/prefix_cache_hits.
PREFIX_CACHE_QUERIES_TOTAL = f"{PREFIX}_prefix_cache_queries_total"
PREFIX_CACHE_HITS_TOTAL = f"{PREFIX}_prefix_cache_hits_total"
PREFIX_CACHE_BYTES = f"{PREFIX}_prefix_cache_bytes"
MAX_RUNNING_REQUESTS = f"{PREFIX}_max_running_requests"
ENGINE_HEALTHY = f"{PREFIX}_engine_healthy"
ENGINE_STEP_FAILURES_TOTAL = f"{PREFIX}_engine_step_failures_total"

# Fleet (cluster mode): the desired model in the Kubernetes API and this replica's convergence on it.
FLEET_DESIRED_MODEL_INFO = f"{PREFIX}_fleet_desired_model_info"
FLEET_REPLICA_CONVERGED = f"{PREFIX}_fleet_replica_converged"
FLEET_ROLLOUTS_TOTAL = f"{PREFIX}_fleet_rollouts_total"
FLEET_ROLLOUT_DURATION_SECONDS = f"{PREFIX}_fleet_rollout_duration_seconds"
KUBE_API_CONNECTED = f"{PREFIX}_kube_api_connected"

# Names exported by prometheus_client's default collectors (used by the dashboards).
PROCESS_START_TIME_SECONDS = "process_start_time_seconds"
PROCESS_RESIDENT_MEMORY_BYTES = "process_resident_memory_bytes"
PROCESS_CPU_SECONDS_TOTAL = "process_cpu_seconds_total"
GC_COLLECTIONS_TOTAL = "python_gc_collections_total"
GC_OBJECTS_COLLECTED_TOTAL = "python_gc_objects_collected_total"
# prometheus_client counts collections but not their duration; the server times them itself.
GC_DURATION_SECONDS = f"{PREFIX}_gc_duration_seconds"

#: Phases of a model deployment, in order; ``failed`` can follow any of them.
DEPLOYMENT_PHASES = ("pending", "resolving", "downloading", "loading", "warming", "ready", "failed")
#: Phases a deployment spends time in (the terminal ones, ready and failed, end it).
TIMED_DEPLOYMENT_PHASES = DEPLOYMENT_PHASES[:-2]
DEPLOYMENT_RESULTS = ("succeeded", "failed")
REJECT_REASONS = ("queue_full", "shutting_down", "no_model")
CANCEL_REASONS = ("client_disconnected", "timeout")
#: How a fleet rollout ended, as this replica saw it converge (or roll back).
ROLLOUT_OUTCOMES = ("ready", "rolled_back")
FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")
#: Where in a scheduler iteration a failure was caught (the request(s) it touched end with an error).
ENGINE_STAGES = ("admit", "prefill", "decode", "sample", "detokenize", "cache", "prefix_cache")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
_LOAD_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600)
_SWAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
_TOKEN_COUNT_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


def _time_gc(histogram: Histogram) -> None:
    """Observe every garbage collection's duration, by generation, through ``gc.callbacks``."""
    started: dict[str, float] = {}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            histogram.labels(str(info["generation"])).observe(time.perf_counter() - started.pop("t"))

    gc.callbacks.append(callback)


@dataclass(frozen=True)
class ServingMetrics:
    """The server's metrics, registered on ``registry`` (one instance per application)."""

    registry: CollectorRegistry
    http_requests: Counter
    http_request_duration: Histogram
    http_requests_in_flight: Gauge
    model_info: Gauge
    model_ready: Gauge
    deployment_phase: Gauge
    deployments: Counter
    model_load_duration: Histogram
    deployment_phase_duration: Histogram
    model_swap_duration: Histogram
    model_download_bytes: Counter
    model_weights_bytes: Gauge
    models_resident: Gauge
    num_requests_running: Gauge
    num_requests_waiting: Gauge
    batch_size: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    requests_finished: Counter
    requests_rejected: Counter
    requests_cancelled: Counter
    request_queue_time: Histogram
    request_prefill_time: Histogram
    request_decode_time: Histogram
    e2e_request_latency: Histogram
    request_prompt_tokens: Histogram
    request_generation_tokens: Histogram
    kv_cache_tokens: Gauge
    prefix_cache_queries: Counter
    prefix_cache_hits: Counter
    prefix_cache_bytes: Gauge
    max_running_requests: Gauge
    engine_healthy: Gauge
    engine_step_failures: Counter
    fleet_desired_model_info: Gauge
    fleet_replica_converged: Gauge
    fleet_rollouts: Counter
    fleet_rollout_duration: Histogram
    kube_api_connected: Gauge

    @classmethod
    def create(
        cls, registry: CollectorRegistry | None = None, *, default_collectors: bool = True
    ) -> ServingMetrics:
        """Build every metric on ``registry`` (a fresh one by default).

        ``default_collectors`` adds the process, platform and GC collectors that the dashboards need
        (uptime, memory, CPU, GC) to the registry; prometheus_client only puts them on its global one.
        """
        registry = registry if registry is not None else CollectorRegistry()
        if default_collectors:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
            _time_gc(
                Histogram(
                    GC_DURATION_SECONDS,
                    "Time spent in garbage collection, by generation.",
                    ["generation"],
                    buckets=_GC_BUCKETS,
                    registry=registry,
                )
            )
        r = registry
        metrics = cls(
            registry=r,
            http_requests=Counter(
                HTTP_REQUESTS_TOTAL, "HTTP requests answered.", ["route", "method", "status"], registry=r
            ),
            http_request_duration=Histogram(
                HTTP_REQUEST_DURATION_SECONDS,
                "Time from request received to response finished.",
                ["route", "method"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            http_requests_in_flight=Gauge(
                HTTP_REQUESTS_IN_FLIGHT, "HTTP requests being handled now.", registry=r
            ),
            model_info=Gauge(
                MODEL_INFO,
                "The model serving now (value 1), identified by its labels.",
                ["model_id", "revision", "dtype", "device"],
                registry=r,
            ),
            model_ready=Gauge(MODEL_READY, "1 while a model is serving, else 0.", registry=r),
            deployment_phase=Gauge(
                DEPLOYMENT_PHASE,
                "Phase of the current or last deployment (1 for the phase it is in).",
                ["phase"],
                registry=r,
            ),
            deployments=Counter(DEPLOYMENTS_TOTAL, "Model deployments by result.", ["result"], registry=r),
            model_load_duration=Histogram(
                MODEL_LOAD_DURATION_SECONDS,
                "Time from a deployment's start to its model serving.",
                buckets=_LOAD_BUCKETS,
                registry=r,
            ),
            deployment_phase_duration=Histogram(
                DEPLOYMENT_PHASE_DURATION_SECONDS,
                "Time a deployment spent in each phase (pending, resolving, downloading, loading, warming).",
                ["phase"],
                buckets=_LOAD_BUCKETS,
                registry=r,
            ),
            model_swap_duration=Histogram(
                MODEL_SWAP_DURATION_SECONDS,
                "Time a swap to a ready model took: switch the reference, record it, free the old model.",
                buckets=_SWAP_BUCKETS,
                registry=r,
            ),
            model_download_bytes=Counter(
                MODEL_DOWNLOAD_BYTES_TOTAL,
                "Bytes of model files downloaded from the hub (rate() of it is the download throughput).",
                registry=r,
            ),
            model_weights_bytes=Gauge(
                MODEL_WEIGHTS_BYTES,
                "Bytes of model weights held in memory, from load until freed (two models during a swap).",
                registry=r,
            ),
            models_resident=Gauge(
                MODELS_RESIDENT, "Models in memory, from load until freed (two during a swap).", registry=r
            ),
            num_requests_running=Gauge(
                NUM_REQUESTS_RUNNING, "Sequences being generated in the batch now.", registry=r
            ),
            num_requests_waiting=Gauge(NUM_REQUESTS_WAITING, "Requests queued for a batch slot.", registry=r),
            batch_size=Histogram(
                BATCH_SIZE, "Sequences per forward pass of the engine.", buckets=_BATCH_BUCKETS, registry=r
            ),
            prompt_tokens=Counter(PROMPT_TOKENS_TOTAL, "Prompt tokens processed.", ["model_id"], registry=r),
            generation_tokens=Counter(
                GENERATION_TOKENS_TOTAL, "Completion tokens generated.", ["model_id"], registry=r
            ),
            time_to_first_token=Histogram(
                TIME_TO_FIRST_TOKEN_SECONDS,
                "Time from request accepted by the engine to its first token.",
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            inter_token_latency=Histogram(
                INTER_TOKEN_LATENCY_SECONDS,
                "Time between consecutive tokens of one request.",
                buckets=_TOKEN_LATENCY_BUCKETS,
                registry=r,
            ),
            requests_finished=Counter(
                REQUESTS_FINISHED_TOTAL,
                "Generation requests finished, by finish reason (stop, length, cancelled, timeout, error).",
                ["finish_reason"],
                registry=r,
            ),
            requests_rejected=Counter(
                REQUESTS_REJECTED_TOTAL,
                "Requests refused before generation (queue_full, shutting_down, no_model).",
                ["reason"],
                registry=r,
            ),
            requests_cancelled=Counter(
                REQUESTS_CANCELLED_TOTAL,
                "Requests stopped before finishing (client_disconnected, timeout).",
                ["reason"],
                registry=r,
            ),
            request_queue_time=Histogram(
                REQUEST_QUEUE_TIME_SECONDS,
                "Time a request waited for a batch slot, from accepted to admitted.",
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            request_prefill_time=Histogram(
                REQUEST_PREFILL_TIME_SECONDS,
                "Time from a request's admission to its first token (the prompt's forward pass).",
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            request_decode_time=Histogram(
                REQUEST_DECODE_TIME_SECONDS,
                "Time from a request's first token to its last.",
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            e2e_request_latency=Histogram(
                E2E_REQUEST_LATENCY_SECONDS,
                "Time from a request accepted by the engine to its end, by finish reason.",
                ["finish_reason"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            request_prompt_tokens=Histogram(
                REQUEST_PROMPT_TOKENS,
                "Prompt length of finished requests, in tokens.",
                buckets=_TOKEN_COUNT_BUCKETS,
                registry=r,
            ),
            request_generation_tokens=Histogram(
                REQUEST_GENERATION_TOKENS,
                "Completion length of finished requests, in tokens.",
                buckets=_TOKEN_COUNT_BUCKETS,
                registry=r,
            ),
            kv_cache_tokens=Gauge(
                KV_CACHE_TOKENS,
                "Token positions held in the KV cache now (rows x columns, left padding included).",
                registry=r,
            ),
            prefix_cache_queries=Counter(
                PREFIX_CACHE_QUERIES_TOTAL, "Prompt tokens looked up in the prefix cache.", registry=r
            ),
            prefix_cache_hits=Counter(
                PREFIX_CACHE_HITS_TOTAL,
                "Prompt tokens found in the prefix cache (their prefill was skipped).",
                registry=r,
            ),
            prefix_cache_bytes=Gauge(
                PREFIX_CACHE_BYTES, "Bytes of keys and values the prefix caches hold now.", registry=r
            ),
            max_running_requests=Gauge(
                MAX_RUNNING_REQUESTS, "Batch slots: most sequences generated together.", registry=r
            ),
            engine_healthy=Gauge(
                ENGINE_HEALTHY, "1 while the engine's scheduler thread runs, 0 once it has died.", registry=r
            ),
            engine_step_failures=Counter(
                ENGINE_STEP_FAILURES_TOTAL,
                "Failures caught in a scheduler iteration, by stage; each ends only the requests it touched.",
                ["stage"],
                registry=r,
            ),
            fleet_desired_model_info=Gauge(
                FLEET_DESIRED_MODEL_INFO,
                "Cluster mode: the model the fleet should serve (value 1), as this replica reads it from "
                "the desired-state ConfigMap.",
                ["model_id", "revision", "rollout_id"],
                registry=r,
            ),
            fleet_replica_converged=Gauge(
                FLEET_REPLICA_CONVERGED,
                "Cluster mode: 1 while this replica serves the desired model, else 0.",
                registry=r,
            ),
            fleet_rollouts=Counter(
                FLEET_ROLLOUTS_TOTAL,
                "Cluster mode: fleet rollouts this replica took part in, by outcome (ready, rolled_back).",
                ["outcome"],
                registry=r,
            ),
            fleet_rollout_duration=Histogram(
                FLEET_ROLLOUT_DURATION_SECONDS,
                "Cluster mode: time from a new desired model seen to this replica serving it.",
                buckets=_LOAD_BUCKETS,
                registry=r,
            ),
            kube_api_connected=Gauge(
                KUBE_API_CONNECTED,
                "Cluster mode: 1 while this replica's watch of the Kubernetes API is established, else 0.",
                registry=r,
            ),
        )
        # Known label values start at 0, so rate() and alerts see a series before the first event.
        for labelled, values in (
            (metrics.deployments, DEPLOYMENT_RESULTS),
            (metrics.requests_rejected, REJECT_REASONS),
            (metrics.requests_cancelled, CANCEL_REASONS),
            (metrics.e2e_request_latency, FINISH_REASONS),
            (metrics.engine_step_failures, ENGINE_STAGES),
            (metrics.fleet_rollouts, ROLLOUT_OUTCOMES),
            (metrics.deployment_phase_duration, TIMED_DEPLOYMENT_PHASES),
        ):
            for value in values:
                labelled.labels(value)
        return metrics
