"""Typed application state shared by the HTTP modules (``app[KEY]``)."""

from __future__ import annotations

from aiohttp import web

from service.api.middleware import ShutdownGate
from service.engine import Engine
from service.lifecycle.fleet import FleetReconciler
from service.lifecycle.manager import ModelManager
from service.metrics import ServingMetrics
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", ServingMetrics)
MANAGER = web.AppKey("manager", ModelManager)
ENGINE = web.AppKey("engine", Engine)
GATE = web.AppKey("shutdown_gate", ShutdownGate)
#: Present in cluster mode only.
FLEET = web.AppKey("fleet", FleetReconciler)
