"""The model server's Grafana dashboard: traffic, latency, the serving model and its deployments, the
fleet (cluster mode: desired model, convergence, rollouts, API connection), generation (tokens, time
to first token, queue), where request time goes (queue, prefill, decode), the model lifecycle (phases,
downloads, resident weights), and the Python process (memory, CPU, GC).
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard

from dashboards import thresholds as limits
from dashboards.fleet import fleet_panels
from dashboards.panels import (
    BLUE,
    DATASOURCE,
    GREEN,
    RED,
    YELLOW,
    Builder,
    Query,
    single_stat,
    state_timeline,
    thresholds,
    time_series,
    value_text,
)
from dashboards.promql import (
    DASHBOARD_SELECTOR,
    DATASOURCE_VAR,
    NAMESPACE_VAR,
    POD_VAR,
    RATE_INTERVAL,
    mean,
    quantile,
    rate,
    ratio,
    selector,
)
from service import metrics as m
from service.api import paths

UID = "model-serving"
FILE_NAME = f"{UID}.json"

S = DASHBOARD_SELECTOR
W = RATE_INTERVAL
#: Routes that run the model; their latency is what users feel (``/metrics`` and probes would hide it).
GENERATION_ROUTES = f'route=~"{paths.COMPLETION}|{paths.OPENAI_CHAT_COMPLETIONS}"'
SERVER_ERRORS = 'status=~"5.."'


def _latency_quantiles(histogram: str, quantiles: tuple[float, ...], *matchers: str) -> list[Query]:
    return [Query(quantile(q, histogram, S, *matchers, window=W), f"p{round(q * 100)}") for q in quantiles]


def _overview() -> list[Builder]:
    return [
        single_stat(
            "Serving model",
            "Model id each selected replica serves now (from the model_info series).",
            Query(f"max by (model_id) ({selector(m.MODEL_INFO, S)} == 1)", "{{model_id}}"),
            unit="none",
            width=8,
            show_name=True,
        ),
        single_stat(
            "Model ready",
            "Lowest readiness over the selected replicas: Not ready while any of them has no model serving.",
            Query(f"min({selector(m.MODEL_READY, S)})"),
            unit="none",
            width=4,
            mappings=value_text({"0": ("Not ready", RED), "1": ("Ready", GREEN)}),
        ),
        single_stat(
            "Uptime",
            "Time since the youngest selected process started; red right after a restart.",
            Query(f"min(time() - {selector(m.PROCESS_START_TIME_SECONDS, S)})"),
            unit="s",
            width=4,
            limits=thresholds(RED, (limits.RECENT_RESTART_S, GREEN)),
        ),
        single_stat(
            "Request rate",
            "HTTP requests per second over all routes.",
            Query(rate(m.HTTP_REQUESTS_TOTAL, S, window=W)),
            unit="reqps",
            width=4,
        ),
        single_stat(
            "Error ratio",
            "Share of HTTP responses that are server errors (5xx); client errors (4xx, 429) are not counted.",
            Query(_error_ratio()),
            unit="percentunit",
            width=4,
            limits=_error_ratio_limits(),
        ),
    ]


def _error_ratio() -> str:
    # "or vector(0)": with no 5xx at all the numerator has no series; show 0, not "No data".
    errors = rate(m.HTTP_REQUESTS_TOTAL, S, SERVER_ERRORS, window=W)
    return f"({errors} or vector(0)) / {rate(m.HTTP_REQUESTS_TOTAL, S, window=W)}"


def _error_ratio_limits() -> dashboard_builders.ThresholdsConfig:
    return thresholds(GREEN, (limits.ERROR_RATIO_WARNING, YELLOW), (limits.ERROR_RATIO_CRITICAL, RED))


def _traffic() -> list[Builder]:
    return [
        time_series(
            "Request rate by route and status",
            "HTTP requests per second, per route and status code.",
            [
                Query(
                    rate(m.HTTP_REQUESTS_TOTAL, S, window=W, group=("route", "status")),
                    "{{route}} {{status}}",
                )
            ],
            unit="reqps",
            width=8,
        ),
        time_series(
            "Error ratio",
            "Share of HTTP responses that are server errors (5xx). The alert fires above the red line.",
            [Query(_error_ratio(), "5xx ratio")],
            unit="percentunit",
            width=8,
            limits=_error_ratio_limits(),
        ),
        time_series(
            "Generation latency p50 / p95 / p99",
            "Time from request to response finished on the generation routes "
            f"({paths.COMPLETION}, {paths.OPENAI_CHAT_COMPLETIONS}). The red line is the latency SLO.",
            _latency_quantiles(m.HTTP_REQUEST_DURATION_SECONDS, (0.5, 0.95, 0.99), GENERATION_ROUTES),
            unit="s",
            width=8,
            limits=thresholds(GREEN, (limits.LATENCY_SLO_S, RED)),
        ),
    ]


_PHASE_COLOURS = {"ready": GREEN, "failed": RED}


def _phase_index() -> str:
    """One series per replica whose value is the index of its current phase in ``DEPLOYMENT_PHASES``."""
    # Exactly one phase gauge is 1 per replica, so at most one term of the "or" has a sample per pod.
    terms = []
    for i, phase in enumerate(m.DEPLOYMENT_PHASES):
        current = selector(m.DEPLOYMENT_PHASE, S, f'phase="{phase}"')
        terms.append(f"max by (pod) ({current} == 1) * 0 + {i}")
    return " or ".join(terms)


def _model() -> list[Builder]:
    phases = {str(i): (phase, _PHASE_COLOURS.get(phase, BLUE)) for i, phase in enumerate(m.DEPLOYMENT_PHASES)}
    return [
        state_timeline(
            "Deployment phase",
            "Phase of the current or last deployment of each replica, over time "
            "(pending, resolving, downloading, loading, warming, then ready or failed).",
            Query(_phase_index(), "{{pod}}"),
            width=12,
            height=6,
            mappings=value_text(phases),
        ),
        time_series(
            "Deployments",
            "Model deployments that ended, by result; each bar is one or more deployments.",
            [Query(f"sum by (result) (increase({selector(m.DEPLOYMENTS_TOTAL, S)}[{W}]))", "{{result}}")],
            unit="short",
            width=6,
            height=6,
            bars=True,
        ),
        time_series(
            "Model load duration",
            "Mean time from a deployment's start to its model serving, over each replica's lifetime.",
            [
                Query(
                    f"max by (pod) ({selector(f'{m.MODEL_LOAD_DURATION_SECONDS}_sum', S)}"
                    f" / {selector(f'{m.MODEL_LOAD_DURATION_SECONDS}_count', S)})",
                    "{{pod}}",
                )
            ],
            unit="s",
            width=6,
            height=6,
        ),
    ]


def _generation() -> list[Builder]:
    return [
        time_series(
            "Tokens per second",
            "Prompt tokens processed and completion tokens generated per second, per model.",
            [
                Query(rate(m.PROMPT_TOKENS_TOTAL, S, window=W, group=("model_id",)), "prompt {{model_id}}"),
                Query(
                    rate(m.GENERATION_TOKENS_TOTAL, S, window=W, group=("model_id",)),
                    "completion {{model_id}}",
                ),
            ],
            unit="suffix: tok/s",
            width=8,
        ),
        time_series(
            "Time to first token p50 / p95",
            "Time from a request accepted by the engine to its first token (queueing included).",
            _latency_quantiles(m.TIME_TO_FIRST_TOKEN_SECONDS, (0.5, 0.95)),
            unit="s",
            width=8,
            limits=thresholds(GREEN, (limits.TIME_TO_FIRST_TOKEN_WARNING_S, YELLOW)),
        ),
        time_series(
            "Inter-token latency p50 / p95",
            "Time between consecutive tokens of one request: the streaming speed a user sees.",
            _latency_quantiles(m.INTER_TOKEN_LATENCY_SECONDS, (0.5, 0.95)),
            unit="s",
            width=8,
        ),
        time_series(
            "Queue depth and running requests",
            "Requests waiting for a batch slot and sequences being generated, per replica.",
            [
                Query(f"sum by (pod) ({selector(m.NUM_REQUESTS_WAITING, S)})", "waiting {{pod}}"),
                Query(f"sum by (pod) ({selector(m.NUM_REQUESTS_RUNNING, S)})", "running {{pod}}"),
            ],
            unit="short",
            width=8,
            limits=thresholds(GREEN, (limits.QUEUE_WAITING_WARNING, YELLOW)),
        ),
        time_series(
            "Batch size p50 / p95",
            "Sequences per forward pass of the engine: how well concurrent requests share the model.",
            _latency_quantiles(m.BATCH_SIZE, (0.5, 0.95)),
            unit="short",
            width=8,
        ),
        time_series(
            "Rejected and cancelled requests",
            "Requests refused before generation (429 queue full, shutting down, no model) and requests "
            "stopped before finishing (client gone, timeout), per second by reason.",
            [
                Query(rate(m.REQUESTS_REJECTED_TOTAL, S, window=W, group=("reason",)), "rejected {{reason}}"),
                Query(
                    rate(m.REQUESTS_CANCELLED_TOTAL, S, window=W, group=("reason",)), "cancelled {{reason}}"
                ),
            ],
            unit="reqps",
            width=8,
        ),
    ]


def _lifetime_mean(histogram: str, group: str) -> str:
    """Mean of a histogram over each process's lifetime: deployments are too rare for a rate window."""
    total = f"sum by ({group}) ({selector(f'{histogram}_sum', S)})"
    return f"{total} / sum by ({group}) ({selector(f'{histogram}_count', S)})"


def _request_phases() -> list[Builder]:
    engine_latency = m.E2E_REQUEST_LATENCY_SECONDS
    return [
        time_series(
            "Request time by phase (mean)",
            "Where a request's time goes, per request on average: waiting for a batch slot (queue), the "
            "prompt's forward pass (prefill), then generating the rest (decode). A growing queue share "
            "means too few replicas; a growing decode share means a slower model or longer answers.",
            [
                Query(mean(m.REQUEST_QUEUE_TIME_SECONDS, S, window=W), "queue"),
                Query(mean(m.REQUEST_PREFILL_TIME_SECONDS, S, window=W), "prefill"),
                Query(mean(m.REQUEST_DECODE_TIME_SECONDS, S, window=W), "decode"),
            ],
            unit="s",
            width=8,
        ),
        time_series(
            "Queue time share of latency",
            "Share of the engine's request latency spent waiting for a batch slot, per replica; the "
            "alert fires above the line.",
            [
                Query(
                    ratio(
                        f"{m.REQUEST_QUEUE_TIME_SECONDS}_sum",
                        f"{engine_latency}_sum",
                        S,
                        window=W,
                        group=("pod",),
                    ),
                    "{{pod}}",
                )
            ],
            unit="percentunit",
            width=8,
            limits=thresholds(GREEN, (limits.QUEUE_TIME_SHARE_WARNING, YELLOW)),
        ),
        time_series(
            "Engine latency p95 by finish reason",
            "Time from a request accepted by the engine to its end, by why it ended (stop, length, "
            "cancelled, timeout, error).",
            [
                Query(
                    quantile(0.95, engine_latency, S, window=W, group=("finish_reason",)),
                    "{{finish_reason}}",
                )
            ],
            unit="s",
            width=8,
        ),
        time_series(
            "KV cache tokens",
            "Token positions held in each replica's KV cache (rows x columns, left padding included).",
            [Query(f"sum by (pod) ({selector(m.KV_CACHE_TOKENS, S)})", "{{pod}}")],
            unit="short",
            width=8,
        ),
        time_series(
            "Prefix cache hit rate",
            "Share of prompt tokens found in the prefix cache (their prefill skipped): a chat's earlier "
            "turns and shared system prompts. Empty with SERVING_PREFIX_CACHE_MB=0.",
            [
                Query(
                    ratio(
                        m.PREFIX_CACHE_HITS_TOTAL, m.PREFIX_CACHE_QUERIES_TOTAL, S, window=W, group=("pod",)
                    ),
                    "{{pod}}",
                )
            ],
            unit="percentunit",
            width=8,
        ),
        time_series(
            "Prompt length p50 / p95",
            "Prompt tokens of finished requests (after the chat template).",
            _latency_quantiles(m.REQUEST_PROMPT_TOKENS, (0.5, 0.95)),
            unit="short",
            width=8,
        ),
        time_series(
            "Generation length p50 / p95",
            "Completion tokens of finished requests.",
            _latency_quantiles(m.REQUEST_GENERATION_TOKENS, (0.5, 0.95)),
            unit="short",
            width=8,
        ),
    ]


def _lifecycle() -> list[Builder]:
    return [
        time_series(
            "Deployment phase durations (mean)",
            "Mean time deployments spent in each phase, over each process's lifetime "
            "(pending, resolving, downloading, loading, warming).",
            [Query(_lifetime_mean(m.DEPLOYMENT_PHASE_DURATION_SECONDS, "phase"), "{{phase}}")],
            unit="s",
            width=6,
        ),
        time_series(
            "Download throughput",
            "Bytes of model files downloaded from the hub per second, per replica.",
            [Query(rate(m.MODEL_DOWNLOAD_BYTES_TOTAL, S, window=W, group=("pod",)), "{{pod}}")],
            unit="Bps",
            width=6,
        ),
        time_series(
            "Resident model weights",
            "Bytes of model weights in memory per replica: it doubles during a swap, while the old model "
            "still serves, and drops once the old model is freed.",
            [Query(f"sum by (pod) ({selector(m.MODEL_WEIGHTS_BYTES, S)})", "{{pod}}")],
            unit="bytes",
            width=6,
        ),
        time_series(
            "Swap duration (mean)",
            "Mean time a swap to a ready model took (switch, record, free the old model), over each "
            "process's lifetime.",
            [Query(_lifetime_mean(m.MODEL_SWAP_DURATION_SECONDS, "pod"), "{{pod}}")],
            unit="s",
            width=6,
        ),
    ]


def _process() -> list[Builder]:
    return [
        time_series(
            "Resident memory",
            "Resident set size of each server process (weights, KV cache and Python heap).",
            [Query(f"max by (pod) ({selector(m.PROCESS_RESIDENT_MEMORY_BYTES, S)})", "{{pod}}")],
            unit="bytes",
            width=6,
        ),
        time_series(
            "CPU",
            "CPU time used per second by each server process, in cores.",
            [Query(rate(m.PROCESS_CPU_SECONDS_TOTAL, S, window=W, group=("pod",)), "{{pod}}")],
            unit="short",
            width=6,
        ),
        time_series(
            "GC collections by generation",
            "Python garbage collections per second, per GC generation (0 is the youngest).",
            [Query(rate(m.GC_COLLECTIONS_TOTAL, S, window=W, group=("generation",)), "gen {{generation}}")],
            unit="short",
            width=6,
        ),
        time_series(
            "GC time by generation",
            "Share of wall-clock time spent in Python garbage collection, per GC generation.",
            [
                Query(
                    rate(f"{m.GC_DURATION_SECONDS}_sum", S, window=W, group=("generation",)),
                    "gen {{generation}}",
                )
            ],
            unit="percentunit",
            width=6,
        ),
    ]


_SECTIONS = (
    ("Overview", _overview),
    ("Traffic", _traffic),
    ("Model", _model),
    ("Fleet", fleet_panels),
    ("Generation", _generation),
    ("Request phases", _request_phases),
    ("Model lifecycle", _lifecycle),
    ("Process", _process),
)


def _variables() -> list[dashboard_builders.DatasourceVariable | dashboard_builders.QueryVariable]:
    namespace = (
        dashboard_builders.QueryVariable(NAMESPACE_VAR)
        .label("Namespace")
        .datasource(DATASOURCE)
        .query(f"label_values({m.MODEL_READY}, namespace)")
        .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
    )
    pod = (
        dashboard_builders.QueryVariable(POD_VAR)
        .label("Pod")
        .datasource(DATASOURCE)
        .query(f'label_values({m.MODEL_READY}{{namespace="${NAMESPACE_VAR}"}}, pod)')
        .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        # "All" becomes ".*" rather than a list of every pod, so the queries stay short.
        .all_value(".*")
    )
    return [
        dashboard_builders.DatasourceVariable(DATASOURCE_VAR).label("Data source").type("prometheus"),
        namespace,
        pod,
    ]


def serving_dashboard() -> dict[str, Any]:
    """The serving dashboard as Grafana JSON (a plain dict, ready for ``json.dumps``)."""
    builder = (
        dashboard_builders.Dashboard("Model serving")
        .uid(UID)
        .description("HTTP traffic, model deployments, generation and process health of the model server.")
        .tags(["model-serving"])
        .editable()
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .variables(_variables())
    )
    panel_id = 0
    for title, section in _SECTIONS:
        panel_id += 1
        builder = builder.with_row(dashboard_builders.Row(title).id(panel_id))
        for panel in section():
            panel_id += 1
            builder = builder.with_panel(panel.id(panel_id))
    # The SDK's encoder turns its model objects into JSON types; loading them back gives plain dicts.
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))
