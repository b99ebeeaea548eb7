"""Composition root: builds the aiohttp application from settings, wiring HTTP → engine/lifecycle."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from service import tracing
from service.api import (
    completion,
    console,
    events,
    health,
    keys,
    load,
    models,
    openai_compat,
    openapi,
    tokenize,
)
from service.api.errors import json_errors
from service.api.middleware import (
    ShutdownGate,
    body_limit,
    enable_cors,
    observe,
    request_ids,
    shutdown_gate,
)
from service.engine import Engine
from service.lifecycle.manager import ModelManager
from service.metrics import ServingMetrics
from service.settings import Settings

#: Threads that render and tokenize prompts: enough to use the cores while the copies of the
#: tokenizer (one per thread and model, ~8 MiB for SmolLM2's) stay few.
TOKENIZER_THREADS = min(4, os.cpu_count() or 1)


async def _tokenizer_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    app[keys.TOKENIZER_POOL].shutdown(cancel_futures=True)


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    if threads := app[keys.SETTINGS].torch_threads:
        # Once, before anything runs: the scheduler thread copies it, models load with it.
        torch.set_num_threads(threads)
    engine = app[keys.ENGINE]
    await engine.start()
    yield
    await engine.stop()


async def _manager_ctx(app: web.Application) -> AsyncIterator[None]:
    manager = app[keys.MANAGER]
    # In cluster mode the fleet reconciler chooses the model (the desired-state ConfigMap).
    await manager.start(deploy=not app[keys.SETTINGS].cluster_mode)
    yield
    await manager.stop()


async def _close_event_streams(app: web.Application) -> None:
    app[keys.MANAGER].events.close()


def _tracer_provider_ctx(provider: TracerProvider) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        provider.shutdown()  # exports the spans still batched

    return ctx


async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
    fleet = app[keys.FLEET]
    await fleet.start()
    yield
    await fleet.stop()


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
) -> web.Application:
    """The server as an application; ``registry`` lets tests keep metrics of several apps apart.

    Tracing follows the ``OTEL_*`` environment (off unless it asks for OTLP), unless a
    ``tracer_provider`` is given (tests: an in-memory exporter; the caller then owns its shutdown).
    """
    metrics = ServingMetrics.create(registry)
    gate = ShutdownGate()
    provider = tracer_provider if tracer_provider is not None else tracing.provider_from_environment()
    options = {
        "client_max_size": settings.max_body_bytes,
        "middlewares": [observe(metrics), json_errors, body_limit(settings.max_body_bytes)],
    }
    app = tracing.instrumented_application(provider, **options) if provider else web.Application(**options)
    tracer = tracing.tracer_of(provider)
    # Inside json_errors, so a bad id is a JSON 400.
    app.middlewares.insert(app.middlewares.index(json_errors) + 1, request_ids(app))
    if settings.cors_origins:
        enable_cors(app, settings.cors_origins)
    app.middlewares.append(shutdown_gate(gate))
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics
    app[keys.GATE] = gate
    app[keys.TRACER] = tracer
    manager = app[keys.MANAGER] = ModelManager(settings, metrics, tracer)
    app[keys.TOKENIZER_POOL] = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
    app[keys.ENGINE] = Engine(
        max_running=settings.max_running_requests,
        max_queued=settings.max_queued_requests,
        request_timeout_s=settings.request_timeout_s,
        metrics=metrics,
        prefix_cache_bytes=int(settings.prefix_cache_mb * 2**20),
    )
    app[load.SAMPLER] = load.LoadSampler(metrics, max_running=settings.max_running_requests)
    # The engine outlives the manager on shutdown: in-flight requests finish before models unload.
    app.cleanup_ctx.extend([_tokenizer_pool_ctx, _engine_ctx, _manager_ctx, load.sampler_ctx])
    if settings.cluster_mode:
        from service.lifecycle.fleet import FleetReconciler  # imports the Kubernetes client (~44 MiB)

        app[keys.FLEET] = FleetReconciler(settings, manager, metrics)
        app.cleanup_ctx.append(_fleet_ctx)
    if provider is not None and tracer_provider is None:
        app.cleanup_ctx.append(_tracer_provider_ctx(provider))
    # Event streams never end by themselves: end them before the server waits for handlers.
    app.on_shutdown.append(_close_event_streams)
    for module in (health, models, completion, openai_compat, tokenize, openapi, load, events):
        app.add_routes(module.routes)
    if settings.console:
        console.setup(app)
    return app
