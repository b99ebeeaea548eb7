"""Composition root: builds the aiohttp application from settings, wiring HTTP → engine/lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from service.api import completion, health, keys, models, openai_compat, openapi
from service.api.errors import json_errors
from service.api.middleware import ShutdownGate, body_limit, enable_cors, observe, shutdown_gate
from service.engine import Engine
from service.lifecycle.fleet import FleetReconciler
from service.lifecycle.manager import ModelManager
from service.metrics import ServingMetrics
from service.settings import Settings


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
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


async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
    fleet = app[keys.FLEET]
    await fleet.start()
    yield
    await fleet.stop()


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> web.Application:
    """The server as an application; ``registry`` lets tests keep metrics of several apps apart."""
    metrics = ServingMetrics.create(registry)
    gate = ShutdownGate()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[observe(metrics), json_errors, body_limit(settings.max_body_bytes)],
    )
    if settings.cors_origins:
        enable_cors(app, settings.cors_origins)
    app.middlewares.append(shutdown_gate(gate))
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics
    app[keys.GATE] = gate
    manager = app[keys.MANAGER] = ModelManager(settings, metrics)
    app[keys.ENGINE] = Engine(
        max_running=settings.max_running_requests,
        max_queued=settings.max_queued_requests,
        request_timeout_s=settings.request_timeout_s,
        metrics=metrics,
    )
    # The engine outlives the manager on shutdown: in-flight requests finish before models unload.
    app.cleanup_ctx.extend([_engine_ctx, _manager_ctx])
    if settings.cluster_mode:
        app[keys.FLEET] = FleetReconciler(settings, manager, metrics)
        app.cleanup_ctx.append(_fleet_ctx)
    for module in (health, models, completion, openai_compat, openapi):
        app.add_routes(module.routes)
    return app
