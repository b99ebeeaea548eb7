"""Tracing: request and deployment spans (in-memory exporter), and OTLP export only when asked for."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import tracing
from service.api import keys
from service.app import create_app
from service.engine.types import FinishReason, GenerationResult, RequestTimings, SamplingParams, Usage
from service.settings import Settings
from tests.server_process import running_server
from tests.test_api import CHAT, broken_copy, deploy, wait_for_phase

PHASES = ("queue", "prefill", "decode", "finish")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}


def test_request_phases_become_child_spans(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    timings = RequestTimings(
        submitted_at=1_700_000_000.0,
        queue_s=0.5,
        prefill_s=0.25,
        ttft_s=0.75,
        decode_s=2.0,
        total_s=2.75,
        prompt_tokens=12,
        completion_tokens=9,
    )
    result = GenerationResult("text", FinishReason.LENGTH, Usage(12, 9), timings=timings)
    tracer = tracing.tracer_of(provider)
    with tracer.start_as_current_span("POST /completion"):
        tracing.record_generation(tracer, result, "tiny")
    spans = exporter.get_finished_spans()
    (http,) = [s for s in spans if s.name == "POST /completion"]
    assert http.attributes is not None
    assert (
        http.attributes["gen_ai.usage.input_tokens"] == 12
        and http.attributes["gen_ai.usage.output_tokens"] == 9
    )
    assert http.attributes["gen_ai.request.model"] == "tiny"
    children = _children(spans, http)
    assert tuple(sorted(children, key=lambda n: children[n].start_time or 0)) == PHASES
    # The phases tile the engine's time: each starts where the previous ended.
    ns = 1_000_000_000
    q, p, d, f = (children[name] for name in PHASES)
    assert q.start_time == 1_700_000_000 * ns and q.end_time == p.start_time == q.start_time + ns // 2
    assert d.start_time == p.end_time == p.start_time + ns // 4
    assert d.end_time == f.start_time == d.start_time + 2 * ns
    assert p.attributes == {"gen_ai.usage.input_tokens": 12}
    assert d.attributes == {"gen_ai.usage.output_tokens": 9, "decode_tokens_per_s": 4.0}
    assert f.attributes == {"gen_ai.response.finish_reasons": ("length",)}


def test_without_a_recording_span_nothing_is_recorded(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    result = GenerationResult("text", FinishReason.STOP, Usage(1, 1))
    tracing.record_generation(tracing.tracer_of(provider), result, "tiny")
    assert exporter.get_finished_spans() == ()


async def _start(
    aiohttp_client: Any, tmp_path: Path, model: Path, provider: TracerProvider, **extra: Any
) -> TestClient:
    settings = Settings(model=str(model), state_dir=tmp_path / "state", torch_threads=1, **extra)
    client = await aiohttp_client(create_app(settings, tracer_provider=provider))
    await wait_for_phase(client, (await (await client.get("/status")).json())["deployment"]["id"])
    return client


async def test_one_trace_per_request_with_its_phases(
    aiohttp_client: Any,
    tmp_path: Path,
    tiny_model_a: Path,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    client = await _start(aiohttp_client, tmp_path, tiny_model_a, provider)
    # Whether this engine reports per-request timings decides whether the phases can be traced.
    manager, engine = client.app[keys.MANAGER], client.app[keys.ENGINE]
    assert manager.active is not None
    probe = await engine.submit(manager.active, [1, 2, 3], SamplingParams(max_tokens=2)).collect()
    exporter.clear()
    for stream in (False, True):
        response = await client.post("/completion", json={**CHAT, "stream": stream})
        assert response.status == 200
        await response.read()
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.kind is trace.SpanKind.SERVER and s.name.startswith("POST")]
    assert len(requests) == 2 and len({s.context.trace_id for s in requests}) == 2
    for http in requests:
        assert http.parent is None and http.attributes is not None
        assert http.attributes["gen_ai.usage.output_tokens"] > 0
        assert http.attributes["gen_ai.usage.input_tokens"] > 0
        children = _children(spans, http)
        assert set(children) == (set(PHASES) if probe.timings is not None else set())
        if probe.timings is not None:
            decode = children["decode"].attributes or {}
            assert decode["gen_ai.usage.output_tokens"] == http.attributes["gen_ai.usage.output_tokens"]


async def test_a_deployment_is_one_trace_with_a_span_per_phase(
    aiohttp_client: Any,
    tmp_path: Path,
    tiny_model_a: Path,
    tiny_model_b: Path,
    models_root: Path,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    client = await _start(
        aiohttp_client, tmp_path, tiny_model_a, provider, model_root=models_root, admin_token="s3cret"
    )
    corrupt = broken_copy(tiny_model_b, models_root, "corrupt-for-tracing")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}garbage")
    status, body = await deploy(client, "corrupt-for-tracing")
    assert status == 202
    await wait_for_phase(client, body["id"])
    spans = exporter.get_finished_spans()
    roots = {s.attributes["deployment.trigger"]: s for s in spans if s.name == "deployment" and s.attributes}
    startup, failed = roots["startup"], roots["api"]
    assert startup.context.trace_id != failed.context.trace_id
    assert startup.attributes and startup.attributes["deployment.outcome"] == "ready"
    phases = _children(spans, startup)
    assert list(sorted(phases, key=lambda n: phases[n].start_time or 0)) == [
        "pending",
        "resolving",
        "loading",
        "warming",
    ]
    assert all(s.context.trace_id == startup.context.trace_id for s in phases.values())
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert failed.status.description and "safetensors" in failed.status.description
    assert failed.attributes and failed.attributes["deployment.id"] == body["id"]
    assert _children(spans, failed)["resolving"].status.status_code is trace.StatusCode.ERROR


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_on_only_when_the_environment_asks_for_otlp(environ: dict[str, str], on: bool) -> None:
    provider = tracing.provider_from_environment(environ)
    assert (provider is not None) == on
    if provider is not None:
        provider.shutdown()


class _Collector:
    """An OTLP/HTTP trace receiver: records every span it is sent (what a collector would get)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []  # (service.name, span name)
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                for resource_spans in request.resource_spans:
                    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope in resource_spans.scope_spans:
                        collector.spans += [(attributes.get("service.name", ""), s.name) for s in scope.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def collector() -> Iterator[_Collector]:
    collector = _Collector()
    yield collector
    collector.server.shutdown()


@pytest.mark.parametrize("configured", [True, False])
def test_server_exports_over_otlp_only_when_configured(
    tmp_path: Path, tiny_model_a: Path, collector: _Collector, configured: bool
) -> None:
    env = {"OTEL_SERVICE_NAME": "chat-test", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    if configured:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.endpoint
    with running_server(tmp_path, model=str(tiny_model_a), env=env) as server:
        assert httpx.post(f"{server.base_url}/completion", json=CHAT, timeout=60).status_code == 200
        assert server.terminate() == 0  # shutdown flushes the batched spans
    if not configured:
        time.sleep(0.2)  # anything in flight would have arrived
        assert collector.spans == []
        return
    names = {name for service, name in collector.spans if service == "chat-test"}
    assert {"deployment", "pending", "loading", "warming", "POST /completion"} <= names, collector.spans
