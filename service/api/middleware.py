"""Cross-cutting HTTP concerns: the shutdown gate, request metrics + access log, and body limits."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from service.api import paths
from service.api.errors import ApiError, shutting_down
from service.metrics import ServingMetrics

log = logging.getLogger("service.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths that keep answering while draining: probes must report the truth, scrapes must not gap, and
#: event streams are not work to drain (they end when the server stops).
_ALWAYS_OPEN = frozenset({paths.HEALTHZ, paths.READYZ, paths.METRICS, paths.STATUS_EVENTS})


class ShutdownGate:
    """Tracks requests in flight and, once closed, turns new ones away with 503 + Retry-After."""

    def __init__(self) -> None:
        self.closed = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def close(self) -> None:
        self.closed = True

    def enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def shutdown_gate(gate: ShutdownGate) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _ALWAYS_OPEN:
            return await handler(request)
        if gate.closed:
            raise shutting_down()
        gate.enter()
        try:
            return await handler(request)
        finally:
            gate.leave()

    return middleware


def body_limit(max_bytes: int) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """413 from the Content-Length header alone, before any of the body is read."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > max_bytes:
            raise ApiError(
                413, f"request body of {request.content_length} bytes is over the {max_bytes}-byte limit"
            )
        return await handler(request)

    return middleware


def observe(metrics: ServingMetrics) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Count, time and log every request (outermost, so it sees the final status of JSON errors)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"  # bounded label values
        start = time.perf_counter()
        status = 500
        metrics.http_requests_in_flight.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # client closed the connection (nginx's convention)
            raise
        finally:
            elapsed = time.perf_counter() - start
            metrics.http_requests_in_flight.dec()
            metrics.http_requests.labels(route, request.method, str(status)).inc()
            metrics.http_request_duration.labels(route, request.method).observe(elapsed)
            if request.path != paths.METRICS:
                log.info(
                    "request",
                    extra={
                        "method": request.method,
                        "path": request.path,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "remote": request.remote,
                        "request_id": request.get("request_id"),
                    },
                )

    return middleware


REQUEST_ID_HEADER = "X-Request-Id"
#: What a client's request id may be: what proxies and tracing systems send, nothing that could
#: forge a log line or a header.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def request_ids(app: web.Application) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Give every request an id (the client's ``X-Request-Id`` when valid, else a new one; 400 for an
    invalid one) in ``request["request_id"]``, and echo it on every response, errors and streams too."""

    async def echo(request: web.Request, response: web.StreamResponse) -> None:
        if request_id := request.get("request_id"):
            response.headers[REQUEST_ID_HEADER] = request_id

    app.on_response_prepare.append(echo)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request["request_id"] = uuid.uuid4().hex
        given = request.headers.get(REQUEST_ID_HEADER)
        if given is not None:
            if not _REQUEST_ID.fullmatch(given):
                raise ApiError(
                    400,
                    f"{REQUEST_ID_HEADER} must be 1-128 characters of letters, digits and ._:/+=-",
                    type="invalid_request",
                )
            request["request_id"] = given
        return await handler(request)

    return middleware


def enable_cors(app: web.Application, origins: list[str]) -> None:
    """Minimal CORS for browser clients of ``origins`` (``*`` allows any); off unless configured.

    Headers are added in ``on_response_prepare`` so streamed (SSE) responses carry them too.
    """
    allow_any = "*" in origins

    def allowed_origin(request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        return origin if origin is not None and (allow_any or origin in origins) else None

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.method == "OPTIONS"
            and allowed_origin(request)
            and "Access-Control-Request-Method" in request.headers
        ):
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type",
                    "Access-Control-Max-Age": "600",
                },
            )
        return await handler(request)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = allowed_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = "*" if allow_any else origin
            response.headers["Vary"] = "Origin"

    app.middlewares.append(preflight)
    app.on_response_prepare.append(add_headers)
