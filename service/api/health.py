"""Probes and the Prometheus scrape endpoint."""

from __future__ import annotations

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from service.api import keys, paths
from service.api.errors import engine_dead, model_not_ready, shutting_down

routes = web.RouteTableDef()


def _check_engine(request: web.Request) -> None:
    if (failure := request.app[keys.ENGINE].failure) is not None:
        raise engine_dead(failure)


@routes.get(paths.HEALTHZ)
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers and the engine's scheduler thread is alive (503 once it has
    died, so the kubelet restarts the pod)."""
    _check_engine(request)
    return web.json_response({"status": "ok"})


@routes.get(paths.READYZ)
async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only while a model serves, the engine lives and the server is not draining."""
    if request.app[keys.GATE].closed:
        raise shutting_down()
    _check_engine(request)
    if request.app[keys.MANAGER].active is None:
        raise model_not_ready()
    return web.json_response({"status": "ready"})


@routes.get(paths.METRICS)
async def metrics(request: web.Request) -> web.Response:
    """prometheus_client's own exposition (text or OpenMetrics by ``Accept``, gzip by ``Accept-Encoding``)."""
    return await make_aiohttp_handler(request.app[keys.METRICS].registry)(request)
