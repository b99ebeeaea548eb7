"""Typed application state shared by the HTTP modules (``app[KEY]``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from aiohttp import web
from opentelemetry import trace

from service.api.middleware import ShutdownGate
from service.engine import Engine
from service.lifecycle.manager import ModelManager
from service.metrics import ServingMetrics
from service.settings import Settings

if TYPE_CHECKING:  # the Kubernetes client is imported in cluster mode only
    from service.lifecycle.fleet import FleetReconciler

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", ServingMetrics)
MANAGER = web.AppKey("manager", ModelManager)
ENGINE = web.AppKey("engine", Engine)
GATE = web.AppKey("shutdown_gate", ShutdownGate)
#: Threads that render and tokenize prompts (each with its own tokenizer copy per model).
TOKENIZER_POOL = web.AppKey("tokenizer_pool", ThreadPoolExecutor)
#: Tracer for the spans the HTTP layer adds under the request's span (a no-op one when tracing is off).
TRACER = web.AppKey("tracer", trace.Tracer)
#: Present in cluster mode only.
FLEET: web.AppKey[FleetReconciler] = web.AppKey("fleet")
