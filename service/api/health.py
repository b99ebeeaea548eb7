"""Probes and the Prometheus scrape endpoint."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api import keys, paths
from service.api.errors import model_not_ready, shutting_down

routes = web.RouteTableDef()


@routes.get(paths.HEALTHZ)
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process and its event loop answer."""
    return web.json_response({"status": "ok"})


@routes.get(paths.READYZ)
async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only while a model serves and the server is not draining."""
    if request.app[keys.GATE].closed:
        raise shutting_down()
    if request.app[keys.MANAGER].active is None:
        raise model_not_ready()
    return web.json_response({"status": "ready"})


@routes.get(paths.METRICS)
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[keys.METRICS].registry)
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response
