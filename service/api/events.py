"""``GET /status/events``: the deployment event stream (Server-Sent Events).

Each connection gets a ``snapshot`` (the body of ``GET /status``) first, then, with a
``Last-Event-ID`` header, the kept events it missed, then live ones; a ``heartbeat`` every
``SERVING_EVENTS_HEARTBEAT_S`` while idle. Snapshot and heartbeat carry no id, so a client's
last id always names a lifecycle event.
"""

from __future__ import annotations

import json

from aiohttp import web

from service.api import keys, paths
from service.api.errors import ApiError
from service.api.generation import SSE_HEADERS
from service.lifecycle.events import Event, EventType

routes = web.RouteTableDef()


def _frame(event: Event) -> bytes:
    head = f"id: {event.id}\n" if event.id is not None else ""
    return f"{head}event: {event.type}\ndata: {json.dumps(event.data, separators=(',', ':'))}\n\n".encode()


def _last_event_id(request: web.Request) -> int | None:
    value = request.headers.get("Last-Event-ID", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ApiError(400, "Last-Event-ID must be the integer id of an event of this stream")
    return int(value)


@routes.get(paths.STATUS_EVENTS)
async def status_events(request: web.Request) -> web.StreamResponse:
    manager = request.app[keys.MANAGER]
    # Subscribing and taking the snapshot without an await between them: no event falls in a gap.
    subscription = manager.events.subscribe(_last_event_id(request))
    snapshot = Event(EventType.SNAPSHOT, manager.status())
    heartbeat = Event(EventType.HEARTBEAT, {})
    heartbeat_s = request.app[keys.SETTINGS].events_heartbeat_s
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        await response.write(_frame(snapshot))
        while True:
            try:
                event = await subscription.next(heartbeat_s)
            except StopAsyncIteration:  # server shutdown, or this listener fell too far behind
                break
            await response.write(_frame(event or heartbeat))
    finally:
        subscription.close()
    await response.write_eof()
    return response
