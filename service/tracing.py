"""OpenTelemetry tracing: a span per HTTP request (with its generation's phases) and per deployment.

Off unless the standard ``OTEL_*`` environment variables ask for an OTLP exporter; then spans go
out over OTLP/HTTP in batches. Off means no SDK at all: the lifecycle gets a no-op tracer and the
HTTP layer no middleware. The HTTP span comes from OpenTelemetry's aiohttp-server instrumentation;
the generation's phases are added under it after the request ends, from the engine's
:class:`~service.engine.types.RequestTimings` (so tracing costs the engine nothing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from service.engine.types import GenerationResult

TRACER_NAME = "model-serving"

# OpenTelemetry's GenAI semantic conventions, so tracing back-ends show token counts natively.
_MODEL = "gen_ai.request.model"
_INPUT_TOKENS = "gen_ai.usage.input_tokens"
_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
_FINISH_REASONS = "gen_ai.response.finish_reasons"


def _enabled(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters:
        return "otlp" in exporters
    return any(
        environ.get(name) for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def provider_from_environment(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A provider exporting over OTLP/HTTP when the environment asks for it, else None (tracing off).

    On: ``OTEL_TRACES_EXPORTER=otlp``, or an ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` with no ``OTEL_TRACES_EXPORTER`` saying otherwise. Off:
    ``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER=none``, or nothing set. The exporter and the
    resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) read the other standard variables.
    """
    if not _enabled(os.environ if environ is None else environ):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tracer_of(provider: TracerProvider | None) -> trace.Tracer:
    return provider.get_tracer(TRACER_NAME) if provider is not None else trace.NoOpTracer()


def instrumented_application(provider: TracerProvider, **kwargs: Any) -> web.Application:
    """``web.Application(**kwargs)`` with the aiohttp-server instrumentation's span middleware first.

    The instrumentor patches ``web.Application`` globally; it is undone at once so that the
    instrumentation stays scoped to this application (tests build several, with their own providers).
    """
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    instrumentor = AioHttpServerInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        return web.Application(**kwargs)
    finally:
        instrumentor.uninstrument()


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def record_generation(tracer: trace.Tracer, result: GenerationResult, model_id: str) -> None:
    """Annotate the current (HTTP) span with the request's model and token counts, and add its phases.

    Child spans, from ``result.timings`` (absent: only the attributes): ``queue`` (accepted →
    admitted to a batch slot), ``prefill`` (→ first token), ``decode`` (→ last token) and ``finish``
    (the engine's end → the HTTP layer done with the result). A no-op when the span is not recorded.
    """
    parent = trace.get_current_span()
    if not parent.is_recording():
        return
    usage = result.usage
    parent.set_attributes(
        {
            _MODEL: model_id,
            _INPUT_TOKENS: usage.prompt_tokens,
            _OUTPUT_TOKENS: usage.completion_tokens,
            _FINISH_REASONS: (result.finish_reason.value,),
        }
    )
    t = result.timings
    if t is None:
        return
    context = trace.set_span_in_context(parent)
    decode: dict[str, Any] = {_OUTPUT_TOKENS: t.completion_tokens}
    if t.decode_tokens_per_s is not None:
        decode["decode_tokens_per_s"] = round(t.decode_tokens_per_s, 2)
    # In integer nanoseconds: float epoch seconds cannot hold sub-microsecond offsets.
    submitted = _ns(t.submitted_at)
    prefill_start = submitted + _ns(t.queue_s)
    decode_start = prefill_start + _ns(t.prefill_s)
    engine_end = submitted + _ns(t.total_s)
    finish = {_FINISH_REASONS: (result.finish_reason.value,)}
    for name, begin, end, attributes in (
        ("queue", submitted, prefill_start, {}),
        ("prefill", prefill_start, decode_start, {_INPUT_TOKENS: t.prompt_tokens}),
        ("decode", decode_start, decode_start + _ns(t.decode_s), decode),
        ("finish", engine_end, max(engine_end, time.time_ns()), finish),
    ):
        span = tracer.start_span(name, context=context, start_time=begin, attributes=attributes)
        span.end(end_time=end)


class DeploymentTrace:
    """One trace per deployment: a root span from pending to its outcome, a child span per phase."""

    def __init__(self, tracer: trace.Tracer, attributes: dict[str, str]) -> None:
        self._tracer = tracer
        self._root = tracer.start_span("deployment", attributes=attributes)
        self._context = trace.set_span_in_context(self._root)
        self._phase: trace.Span | None = None

    def phase(self, name: str) -> None:
        """End the running phase's span and start ``name``'s."""
        if self._phase is not None:
            self._phase.end()
        self._phase = self._tracer.start_span(name, context=self._context)

    def end(self, phase: str, error: str | None) -> None:
        """Close the trace in its terminal ``phase``; an ``error`` marks the root and the phase it hit."""
        spans = [self._root] if self._phase is None else [self._phase, self._root]
        self._root.set_attribute("deployment.outcome", phase)
        for span in spans:
            if error is not None:
                span.set_status(trace.StatusCode.ERROR, error)
            span.end()
