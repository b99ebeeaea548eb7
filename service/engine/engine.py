"""The generation engine: a bounded queue and one scheduler thread doing iteration-level batching.

Every scheduler iteration (1) drops cancelled and timed-out requests, (2) admits waiting requests
into free slots and prefills them, and (3) runs one decode step for every running sequence of
each model handle. A request therefore joins the shared batch at the next step rather than
waiting for the batch to drain, and leaves it the moment it finishes. Sequences of different
handles never share a forward pass; a handle is forgotten (with its KV cache) as soon as its
last sequence ends, so a swapped-out model can be freed.

Model work runs only on the scheduler thread; the event loop only enqueues and receives
results (through ``call_soon_threadsafe``), so generation never blocks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque

import torch

from service.engine.batch import HandleBatch
from service.engine.sampling import sample_next_tokens
from service.engine.sequence import Sequence
from service.engine.stream import GenerationStream
from service.engine.types import (
    EngineStoppedError,
    FinishReason,
    GenerationResult,
    QueueFullError,
    SamplingParams,
    TokenDelta,
)
from service.handle import ModelHandle
from service.metrics import ServingMetrics

log = logging.getLogger(__name__)

_Delivery = tuple[GenerationStream, TokenDelta | GenerationResult]


class Engine:
    """Schedules requests onto their model handles with continuous batching."""

    def __init__(
        self,
        max_running: int = 16,
        max_queued: int = 64,
        request_timeout_s: float = 300.0,
        metrics: ServingMetrics | None = None,
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.request_timeout_s = request_timeout_s
        self._metrics = metrics
        self._lock = threading.Condition()
        # Guarded by _lock: requests not yet admitted, requests not yet finished (waiting + running).
        self._waiting: deque[Sequence] = deque()
        self._outstanding = 0
        self._running = 0
        self._accepting = False
        self._stopping = False
        # Owned by the scheduler thread.
        self._batches: dict[ModelHandle, HandleBatch] = {}
        self._outbox: list[_Delivery] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._idle = asyncio.Event()  # set while nothing is outstanding (what drain() waits for)
        self._idle.set()
        self._ids = itertools.count()
        self._mean_request_s = 1.0  # moving average, for Retry-After

    # ----------------------------------------------------------------------------- public API (event loop)

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        """Start the scheduler thread (it inherits the caller's ``torch.get_num_threads()``)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(
            target=self._run, args=(torch.get_num_threads(),), name="engine-scheduler", daemon=True
        )
        self._thread.start()

    def submit(self, handle: ModelHandle, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        """Queue a request; raises :class:`QueueFullError` or :class:`EngineStoppedError` at once."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        request_id = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        stream = GenerationStream(request_id, self._on_cancel)
        now = time.monotonic()
        with self._lock:
            if not self._accepting:
                self._count_rejected("shutting_down")
                raise EngineStoppedError("the engine is not accepting requests")
            # Bounding waiting + running (rather than waiting alone) keeps the limit exact even while
            # the scheduler is between admitting and running.
            if self._outstanding >= self.max_running + self.max_queued:
                self._count_rejected("queue_full")
                raise QueueFullError(self._retry_after_s())
            self._waiting.append(
                Sequence(
                    request_id=request_id,
                    handle=handle,
                    prompt_ids=list(prompt_ids),
                    params=params,
                    stream=stream,
                    submitted_at=now,
                    deadline=now + self.request_timeout_s,
                )
            )
            self._outstanding += 1
            self._idle.clear()
            self._set_gauges()
            self._lock.notify()
        return stream

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting requests, wait up to ``timeout_s`` for those in flight; True if all finished."""
        with self._lock:
            self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Cancel whatever is left and stop the scheduler thread."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # ----------------------------------------------------------------------------- scheduler thread

    def _run(self, num_threads: int) -> None:
        torch.set_num_threads(num_threads)  # the setting is per thread for OpenMP builds
        while self._wait_for_work():
            # Each iteration is its own call, so no local reference to a handle outlives it.
            with torch.inference_mode():
                self._iteration()
        self._shutdown()

    def _wait_for_work(self) -> bool:
        with self._lock:
            while not (self._stopping or self._waiting or self._batches):
                self._lock.wait()
            return not self._stopping

    def _iteration(self) -> None:
        now = time.monotonic()
        for batch in self._batches.values():
            for seq in batch.seqs:
                self._check_abandoned(seq, now)
            self._retire(batch)
        for handle, seqs in self._admit(now).items():
            batch = self._batches.get(handle) or self._new_batch(handle, seqs)
            if batch is not None:
                self._batches[handle] = batch
                self._prefill(batch, seqs)
        for batch in self._batches.values():
            if batch.seqs:
                self._decode(batch)
        self._batches = {h: b for h, b in self._batches.items() if b.seqs}
        with self._lock:
            self._set_gauges()

    def _admit(self, now: float) -> dict[ModelHandle, list[Sequence]]:
        """Move waiting requests into free slots (FIFO), grouped by handle; finish abandoned ones."""
        admitted: dict[ModelHandle, list[Sequence]] = {}
        with self._lock:
            # Sweep the whole queue, so a cancelled request frees its place even while all slots are busy.
            abandoned = [seq for seq in self._waiting if self._check_abandoned(seq, now)]
            if abandoned:
                self._waiting = deque(seq for seq in self._waiting if not seq.finished)
            while self._waiting and self._running < self.max_running:
                seq = self._waiting.popleft()
                self._running += 1
                admitted.setdefault(seq.handle, []).append(seq)
        for seq in abandoned:
            self._finish(seq, admitted=False)
        self._flush()
        return admitted

    def _new_batch(self, handle: ModelHandle, seqs: list[Sequence]) -> HandleBatch | None:
        """A batch for a handle not running yet; None (and ``seqs`` ended) if the handle is unusable."""
        try:
            return HandleBatch(handle)
        except Exception as exc:
            log.exception("cannot generate with this model handle")
            for seq in seqs:
                seq.finish(FinishReason.ERROR, f"generation failed: {exc}")
                self._finish(seq, admitted=True)
            self._flush()
            return None

    def _prefill(self, batch: HandleBatch, seqs: list[Sequence]) -> None:
        ready: list[Sequence] = []
        for seq in seqs:
            try:
                seq.admit(batch.device, batch.context_length)
                ready.append(seq)
            except ValueError as exc:
                seq.finish(FinishReason.ERROR, str(exc))
                self._finish(seq, admitted=True)
        if ready:
            try:
                logits = batch.prefill(ready)
            except Exception as exc:  # a failed prefill ends these requests, not the engine
                log.exception("prefill failed")
                for seq in ready:
                    seq.finish(FinishReason.ERROR, f"generation failed: {exc}")
                    self._finish(seq, admitted=True)
            else:
                if self._metrics is not None:
                    model_id = batch.handle.info.model_id
                    self._metrics.prompt_tokens.labels(model_id).inc(sum(len(s.prompt_ids) for s in ready))
                self._emit_tokens(batch, ready, logits)
        self._flush()

    def _decode(self, batch: HandleBatch) -> None:
        try:
            logits = batch.decode()
        except Exception as exc:  # the shared cache may be half-updated: end the whole batch
            log.exception("decode step failed")
            for seq in batch.seqs:
                seq.finish(FinishReason.ERROR, f"generation failed: {exc}")
            self._retire(batch)
            self._flush()
            return
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch.seqs))
        self._emit_tokens(batch, batch.seqs, logits)
        self._flush()

    def _emit_tokens(self, batch: HandleBatch, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence, queue its delta, and retire sequences that ended."""
        try:
            tokens = sample_next_tokens(logits, seqs)
        except Exception as exc:  # e.g. NaN probabilities from a broken model
            log.exception("sampling failed")
            for seq in seqs:
                seq.finish(FinishReason.ERROR, f"sampling failed: {exc}")
            self._retire(batch)
            return
        now = time.monotonic()
        for seq, token in zip(seqs, tokens, strict=True):
            text = seq.add_token(token, token in batch.eos_ids)
            self._observe_token(seq, now)
            self._outbox.append((seq.stream, TokenDelta(text=text, token_ids=(token,))))
        if self._metrics is not None:
            self._metrics.generation_tokens.labels(batch.handle.info.model_id).inc(len(seqs))
        self._retire(batch)

    def _retire(self, batch: HandleBatch) -> None:
        for seq in batch.remove_finished():
            self._finish(seq, admitted=True)

    def _check_abandoned(self, seq: Sequence, now: float) -> bool:
        """Mark a cancelled or timed-out sequence finished; True if it was."""
        if seq.stream.cancel_requested:
            seq.finish(FinishReason.CANCELLED, "the client went away")
            self._count_cancelled("client_disconnected")
        elif now >= seq.deadline:
            seq.finish(FinishReason.TIMEOUT, f"request exceeded {self.request_timeout_s:g}s")
            self._count_cancelled("timeout")
        return seq.finished

    def _finish(self, seq: Sequence, *, admitted: bool) -> None:
        """Queue the tail text and the result of a finished sequence, and release its place (and its
        batch slot if it was ``admitted``)."""
        tail = seq.release_tail() if seq.finish_reason is not FinishReason.CANCELLED else ""
        if tail:
            self._outbox.append((seq.stream, TokenDelta(text=tail, token_ids=())))
        result = seq.result()
        self._outbox.append((seq.stream, result))
        if self._metrics is not None:
            self._metrics.requests_finished.labels(result.finish_reason.value).inc()
        elapsed = time.monotonic() - seq.submitted_at
        with self._lock:
            self._outstanding -= 1
            self._running -= int(admitted)
            self._mean_request_s += 0.1 * (elapsed - self._mean_request_s)

    def _shutdown(self) -> None:
        """Cancel everything left (the engine is stopping) and drop every handle."""
        with self._lock:
            leftovers = list(self._waiting)
            self._waiting.clear()
        for seq in leftovers:
            seq.finish(FinishReason.CANCELLED, "the server is shutting down")
            self._finish(seq, admitted=False)
        for batch in self._batches.values():
            for seq in batch.seqs:
                seq.finish(FinishReason.CANCELLED, "the server is shutting down")
            self._retire(batch)
        self._batches.clear()
        with self._lock:
            self._set_gauges()
        self._flush()

    # ----------------------------------------------------------------------------- delivery and metrics

    def _flush(self) -> None:
        """Hand the queued deltas and results to the event loop in one wake-up."""
        if not self._outbox or self._loop is None:
            return
        deliveries, self._outbox = self._outbox, []
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._deliver, deliveries)

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        for stream, item in deliveries:
            stream._put(item)
        with self._lock:
            if self._outstanding == 0:  # checked here, on the loop, so a racing submit() wins
                self._idle.set()

    def _on_cancel(self, stream: GenerationStream) -> None:
        with self._lock:
            self._lock.notify()

    def _observe_token(self, seq: Sequence, now: float) -> None:
        if self._metrics is not None:
            if seq.first_token_at is None:
                self._metrics.time_to_first_token.observe(now - seq.submitted_at)
            else:
                assert seq.last_token_at is not None
                self._metrics.inter_token_latency.observe(now - seq.last_token_at)
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now

    def _retry_after_s(self) -> float:
        """A guess at when a slot frees up: queue length over slots times the mean request time."""
        waves = (len(self._waiting) + 1) / self.max_running
        return float(max(1, math.ceil(waves * self._mean_request_s)))

    def _set_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.num_requests_running.set(self._running)
            self._metrics.num_requests_waiting.set(len(self._waiting))

    def _count_rejected(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.requests_rejected.labels(reason).inc()

    def _count_cancelled(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.requests_cancelled.labels(reason).inc()
