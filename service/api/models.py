"""Model lifecycle endpoints: ``GET /model``, ``POST /model`` (admin) and ``GET /status``.

In cluster mode ``POST /model`` changes the fleet's desired model (every replica converges on it)
and ``GET /status`` adds the fleet's view; the lifecycle's fleet reconciler does both.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from service.api import keys, paths
from service.api.errors import ApiError, model_not_ready, parse_body
from service.api.protocol import DeployRequest
from service.lifecycle.fleet_errors import FleetUnavailableError, RolloutInProgressError
from service.lifecycle.manager import DeploymentConflictError, model_info_dict
from service.lifecycle.sources import SourceError

routes = web.RouteTableDef()


def require_admin(request: web.Request) -> None:
    """Bearer-token check for admin endpoints, in constant time; a no-op when no token is configured."""
    token = request.app[keys.SETTINGS].admin_token
    if token is None:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(
            401,
            "this endpoint needs an 'Authorization: Bearer <token>' header",
            type="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ApiError(403, "the admin token is not valid", type="forbidden")


@routes.get(paths.MODEL)
async def get_model(request: web.Request) -> web.Response:
    active = request.app[keys.MANAGER].active
    if active is None:
        raise model_not_ready()
    return web.json_response(model_info_dict(active))


@routes.post(paths.MODEL)
async def deploy_model(request: web.Request) -> web.Response:
    require_admin(request)
    body = await parse_body(request, DeployRequest)
    manager = request.app[keys.MANAGER]
    fleet = request.app.get(keys.FLEET)
    try:
        if fleet is None:
            deployment, started = await manager.deploy(body.model_id, body.revision)
            answer = deployment.as_dict()
        else:
            await manager.validate(body.model_id, body.revision)
            started = await fleet.request_rollout(body.model_id, body.revision)
            answer = await fleet.view()
    except SourceError as exc:
        raise ApiError(exc.status, str(exc), type="invalid_model") from exc
    except (DeploymentConflictError, RolloutInProgressError) as exc:
        raise ApiError(
            409,
            f"{exc}; retry once it has finished (GET /status)",
            type="deployment_in_progress",
            headers={"Retry-After": "2"},
        ) from exc
    except FleetUnavailableError as exc:
        raise ApiError(503, str(exc), type="kube_api_unavailable", headers={"Retry-After": "5"}) from exc
    if not started:
        return web.json_response(answer, status=200)
    return web.json_response(answer, status=202, headers={"Location": paths.STATUS})


@routes.get(paths.STATUS)
async def status(request: web.Request) -> web.Response:
    body = request.app[keys.MANAGER].status()
    fleet = request.app.get(keys.FLEET)
    if fleet is not None:
        body["fleet"] = await fleet.view()
    return web.json_response(body)
