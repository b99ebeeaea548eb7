"""The scheduler: the bounded waiting queue, the batch slots and the deadlines; it plans each step.

Submissions arrive from the event loop, plans and releases come from the scheduler thread; one
condition variable guards the queue and the slots between the two. The scheduler touches no model:
it decides which requests end (cancelled, past their deadline) and which start, and the engine
carries that out with the model runner and the output processor.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

from service.engine.sequence import Sequence
from service.engine.telemetry import EngineMetrics
from service.engine.types import EngineDeadError, EngineStoppedError, FinishReason, QueueFullError
from service.handle import ModelHandle


@dataclass
class Plan:
    """One step's decisions: waiting requests that ended before a slot (to deliver at once), and the
    requests admitted now, grouped by handle (to prefill). Running requests that must end are marked
    finished in place; the engine cuts them out of their batch."""

    abandoned: list[Sequence] = field(default_factory=list)
    admitted: dict[ModelHandle, list[Sequence]] = field(default_factory=dict)


class Scheduler:
    """FIFO admission into ``max_running`` slots, with at most ``max_queued`` requests waiting."""

    def __init__(self, max_running: int, max_queued: int, request_timeout_s: float, metrics: EngineMetrics):
        self.max_running = max_running
        self.max_queued = max_queued
        self.request_timeout_s = request_timeout_s
        self._metrics = metrics
        self._lock = threading.Condition()
        # Guarded by _lock.
        self._waiting: deque[list[Sequence]] = deque()  # the choices of one request, admitted together
        self._running: set[Sequence] = set()  # admitted and not yet released
        self._accepting = False
        self._stopping = False
        self.failure: str | None = None
        self._mean_request_s = 1.0  # moving average, for Retry-After

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return sum(len(group) for group in self._waiting)

    @property
    def outstanding(self) -> int:
        return self.num_waiting + len(self._running)

    # ------------------------------------------------------------------ event loop side

    def open(self) -> None:
        with self._lock:
            self._accepting = True

    def add(self, seqs: list[Sequence]) -> None:
        """Queue ``seqs`` (the choices of one request, each counting as one request); raises
        :class:`EngineDeadError`, :class:`EngineStoppedError` or :class:`QueueFullError` at once."""
        with self._lock:
            if self.failure is not None:
                raise EngineDeadError(self.failure)
            if not self._accepting:
                self._metrics.rejected("shutting_down")
                raise EngineStoppedError("the engine is not accepting requests")
            # Bounding waiting + running (rather than waiting alone) keeps the limit exact even while
            # the scheduler is between admitting and running.
            if self.outstanding + len(seqs) > self.max_running + self.max_queued:
                self._metrics.rejected("queue_full")
                raise QueueFullError(self._retry_after_s())
            self._waiting.append(seqs)
            self._lock.notify()

    def close(self) -> None:
        """Take no new requests (draining)."""
        with self._lock:
            self._accepting = False

    def stop(self) -> None:
        """Take no new requests and make the thread leave :meth:`wait_for_work`."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._lock.notify()

    def wake(self) -> None:
        """Let the thread look at the requests again (one was cancelled)."""
        with self._lock:
            self._lock.notify()

    # ------------------------------------------------------------------ scheduler thread

    def wait_for_work(self, busy: bool) -> bool:
        """Block until there is a request to run (or ``busy``: sequences are running); False to stop."""
        with self._lock:
            while not (self._stopping or self._waiting or busy):
                self._lock.wait()
            return not self._stopping

    def schedule(self, now: float) -> Plan:
        """End cancelled and timed-out requests, then admit waiting ones into free slots (FIFO; the
        choices of one request together)."""
        plan = Plan()
        with self._lock:
            for seq in self._running:
                self._check_abandoned(seq, now)
            # Sweep the whole queue, so a cancelled request frees its place even while all slots are busy.
            plan.abandoned = [
                seq for group in self._waiting for seq in group if self._check_abandoned(seq, now)
            ]
            if plan.abandoned:
                groups = ([seq for seq in group if not seq.finished] for group in self._waiting)
                self._waiting = deque(group for group in groups if group)
            while self._waiting and len(self._running) + len(self._waiting[0]) <= self.max_running:
                for seq in self._waiting.popleft():
                    seq.admitted_at = now
                    self._running.add(seq)
                    self._metrics.admitted(now - seq.submitted_at)
                    plan.admitted.setdefault(seq.handle, []).append(seq)
        return plan

    def release(self, seq: Sequence, now: float) -> None:
        """``seq`` has ended: free its slot or its place in the queue."""
        with self._lock:
            self._running.discard(seq)
            self._mean_request_s += 0.1 * (now - seq.submitted_at - self._mean_request_s)

    def take_waiting(self) -> list[Sequence]:
        """Empty the queue (the engine is stopping) and return what it held."""
        with self._lock:
            leftovers = [seq for group in self._waiting for seq in group]
            self._waiting.clear()
        return leftovers

    def kill(self, reason: str) -> list[Sequence]:
        """Record that the scheduler thread died of ``reason``; return every outstanding request."""
        with self._lock:
            self.failure = reason
            self._accepting = False
            outstanding = [*(seq for group in self._waiting for seq in group), *self._running]
            self._waiting.clear()
            self._running.clear()
        return outstanding

    def _check_abandoned(self, seq: Sequence, now: float) -> bool:
        """Mark a cancelled or timed-out sequence finished; True if it is finished."""
        if seq.finished:
            return True
        if seq.stream.cancel_requested:
            seq.finish(FinishReason.CANCELLED, "the client went away")
            self._metrics.cancelled("client_disconnected")
        elif now >= seq.deadline:
            seq.finish(FinishReason.TIMEOUT, f"request exceeded {self.request_timeout_s:g}s")
            self._metrics.cancelled("timeout")
        return seq.finished

    def _retry_after_s(self) -> float:
        """A guess at when a slot frees up: queue length over slots times the mean request time."""
        waves = (self.num_waiting + 1) / self.max_running
        return float(max(1, math.ceil(waves * self._mean_request_s)))
