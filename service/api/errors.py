"""JSON errors: every non-2xx answer is ``{"error": {"type", "message"}}`` with the right status."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error answer: raise it anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
        self.headers = dict(headers or {})
        self.details = details


#: Seconds a client is told to wait before retrying on another replica or later.
DRAIN_RETRY_AFTER_S = 5
MODEL_RETRY_AFTER_S = 2


def shutting_down() -> ApiError:
    return ApiError(
        503,
        "the server is shutting down; retry on another replica",
        type="shutting_down",
        headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)},
    )


def engine_dead(reason: str) -> ApiError:
    """The generation engine's scheduler has died: this replica serves nothing until it restarts."""
    return ApiError(
        503,
        f"the generation engine has stopped ({reason}); this replica must restart, retry on another",
        type="engine_dead",
        headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)},
    )


def model_not_ready() -> ApiError:
    return ApiError(
        503,
        "no model is serving yet; see GET /status",
        type="model_not_ready",
        headers={"Retry-After": str(MODEL_RETRY_AFTER_S)},
    )


def error_response(err: ApiError) -> web.Response:
    body: dict[str, Any] = {"type": err.type, "message": err.message}
    if err.details is not None:
        body["details"] = err.details
    return web.json_response({"error": body}, status=err.status, headers=err.headers)


def _validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Read and validate a JSON body: 415 for other media types, 400 for bad JSON, 422 for bad fields."""
    if request.content_type != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got {request.content_type!r}")
    raw = await request.read()  # aiohttp enforces client_max_size while reading (413)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", type="invalid_json") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(
            422, f"{where}: {first['msg']}", type="invalid_request", details=_validation_details(exc)
        ) from exc


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every error into the JSON shape; an unexpected exception is a logged 500, never a crash."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return error_response(ApiError(exc.status, message, headers=headers))
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(ApiError(500, "internal server error"))
