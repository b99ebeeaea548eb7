"""The deployment event stream: phase changes, progress and outcomes, fanned out to listeners.

The lifecycle publishes on the event loop; each listener reads from its own bounded buffer, so a
slow or stuck listener never blocks a deployment or the engine: once its buffer is full it is
dropped (its stream ends and the client resumes with ``Last-Event-ID`` from the history).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

#: Events kept for ``Last-Event-ID`` resumption (a deployment publishes a dozen or so plus progress).
HISTORY_LENGTH = 256
#: Events buffered per listener before it is dropped as too slow (room for a full history replay).
LISTENER_BUFFER = 512


class EventType(StrEnum):
    SNAPSHOT = "snapshot"  # first event of a connection: the body of GET /status (no id)
    PHASE = "phase"  # a deployment entered a phase: the deployment dict
    PROGRESS = "progress"  # download bytes or load tensors: {deployment_id, stage, done, total, unit}
    OUTCOME = "outcome"  # a deployment ended ready or failed: the deployment dict
    HEARTBEAT = "heartbeat"  # keeps idle connections and proxies alive (no id)


@dataclass(frozen=True)
class Event:
    """One event; ``id`` is monotonic per process, None for per-connection events."""

    type: EventType
    data: dict[str, Any]
    id: int | None = None


class Subscription:
    """One listener's view: the events it missed (from the history), then live ones, until closed."""

    def __init__(self, hub: EventHub, backlog: list[Event]) -> None:
        self._hub = hub
        self._buffer: deque[Event] = deque(backlog)
        self._wakeup = asyncio.Event()
        self._wakeup.set()
        self.closed = False
        #: True when the hub dropped this listener for falling ``LISTENER_BUFFER`` events behind.
        self.lagged = False

    def _push(self, event: Event) -> None:
        if len(self._buffer) >= LISTENER_BUFFER:
            self.lagged = True
            self.close()
            return
        self._buffer.append(event)
        self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._hub._listeners.discard(self)
        self._wakeup.set()

    async def next(self, timeout_s: float | None) -> Event | None:
        """The next event; None after ``timeout_s`` (None: no limit) without one.

        Raises StopAsyncIteration once closed and drained."""
        while not self._buffer:
            if self.closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout_s)
            except TimeoutError:
                return None
        return self._buffer.popleft()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        event = await self.next(None)
        assert event is not None  # only a timeout gives None
        return event


class EventHub:
    """Publishes lifecycle events to every subscriber; call it from the event loop only."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._history: deque[Event] = deque(maxlen=HISTORY_LENGTH)
        self._listeners: set[Subscription] = set()
        self._closed = False

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def publish(self, type: EventType, data: dict[str, Any]) -> Event:
        event = Event(type, data, next(self._ids))
        self._history.append(event)
        for listener in list(self._listeners):
            listener._push(event)
        return event

    def subscribe(self, last_event_id: int | None = None) -> Subscription:
        """A new listener; with ``last_event_id`` it first gets the kept events published after it."""
        backlog = [] if last_event_id is None else [e for e in self._history if e.id > last_event_id]
        subscription = Subscription(self, backlog)
        if self._closed:
            subscription.closed = True
        else:
            self._listeners.add(subscription)
        return subscription

    def close(self) -> None:
        """End every stream (server shutdown); listeners first receive what is still buffered."""
        self._closed = True
        for listener in list(self._listeners):
            listener.close()


class ProgressPublisher:
    """A progress callback for worker threads: publishes ``progress`` events on the hub's loop,
    at most one per ``interval_s`` per stage (the first and the last always), in order."""

    def __init__(
        self,
        hub: EventHub,
        loop: asyncio.AbstractEventLoop,
        deployment_id: str,
        stage: str,
        unit: str,
        interval_s: float = 0.25,
    ) -> None:
        self._hub, self._loop, self._interval_s = hub, loop, interval_s
        self._data = {"deployment_id": deployment_id, "stage": stage, "unit": unit}
        self._last: float | None = None

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        last = total is not None and done >= total
        if not last and self._last is not None and now - self._last < self._interval_s:
            return
        self._last = now
        data = {**self._data, "done": done, "total": total}
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped mid-deployment
            self._loop.call_soon_threadsafe(self._hub.publish, EventType.PROGRESS, data)
