"""The generation engine: one scheduler thread doing iteration-level batching, in three rooms.

Every scheduler iteration (a *step*) asks the :class:`Scheduler` for a plan (drop cancelled and
timed-out requests, admit waiting ones into free slots), has the :class:`ModelRunner` execute it
(prefill the admitted prompts, one decode step for every running sequence of each model handle,
sampling), and gives the sampled tokens to the :class:`OutputProcessor` (detokenizing, stop
strings, deliveries, metrics). A request therefore joins the shared batch at the next step rather
than waiting for the batch to drain, and leaves it the moment it finishes. Calls go one way: this
facade calls the three rooms; they never call each other or back.

Crash barrier: each stage of a step runs under a guard. A failure ends only the requests it
touched (an error result) and is counted in ``engine_step_failures{stage}``; the step goes on. If
the thread dies anyway, :attr:`Engine.failure` says why, every outstanding request ends with an
error and :meth:`Engine.submit` raises :class:`EngineDeadError`. Deadlines hold whatever the thread
does: a timer on the event loop ends a request its scheduler has not ended in time.

Model work runs only on the scheduler thread; the event loop only enqueues and receives results
(through ``call_soon_threadsafe``), so generation never blocks it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable

import torch

from service.engine.batch import CacheError
from service.engine.grammar import GrammarCompiler
from service.engine.model_runner import ModelRunner
from service.engine.output_processor import OutputProcessor
from service.engine.scheduler import Scheduler
from service.engine.sequence import Sequence
from service.engine.stream import GenerationStream
from service.engine.telemetry import EngineMetrics, PrometheusEngineMetrics
from service.engine.types import FinishReason, SamplingParams
from service.handle import ModelHandle
from service.metrics import ServingMetrics

log = logging.getLogger(__name__)


class Engine:
    """Schedules requests onto their model handles with continuous batching."""

    def __init__(
        self,
        max_running: int = 16,
        max_queued: int = 64,
        request_timeout_s: float = 300.0,
        metrics: ServingMetrics | None = None,
        prefix_cache_bytes: int = 0,
    ) -> None:
        """``prefix_cache_bytes``: how much KV each model may keep for prompts that start like earlier
        sequences (:mod:`service.engine.prefix_cache`); 0, the default, turns prefix caching off."""
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.request_timeout_s = request_timeout_s
        self._metrics = EngineMetrics() if metrics is None else PrometheusEngineMetrics(metrics)
        self._scheduler = Scheduler(max_running, max_queued, request_timeout_s, self._metrics)
        self._runner = ModelRunner(prefix_cache_bytes)
        self.grammars = GrammarCompiler()  # constrained decoding: compile off the loop, pass in params
        self._output = OutputProcessor(self._metrics, on_delivered=self._check_idle)
        self._thread: threading.Thread | None = None
        self._idle = asyncio.Event()  # set while nothing is outstanding (what drain() waits for)
        self._idle.set()
        self._ids = itertools.count()
        self._metrics.watch(self)

    # ----------------------------------------------------------------------------- public API (event loop)

    @property
    def num_running(self) -> int:
        return self._scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self._scheduler.num_waiting

    @property
    def kv_cache_tokens(self) -> int:
        """Token positions held in the KV caches now (rows x columns, left padding included)."""
        return self._runner.cache_tokens

    @property
    def prefix_cache_held(self) -> int:
        """Bytes of keys and values held for reuse by later prompts, over every model."""
        return self._runner.prefix_cache_held

    @property
    def failure(self) -> str | None:
        """None while the scheduler thread lives; why it died, once it has."""
        return self._scheduler.failure

    async def start(self) -> None:
        """Start the scheduler thread (it inherits the caller's ``torch.get_num_threads()``)."""
        if self._thread is not None:
            return
        self._output.bind(asyncio.get_running_loop())
        self._scheduler.open()
        self._thread = threading.Thread(
            target=self._run, args=(torch.get_num_threads(),), name="engine-scheduler", daemon=True
        )
        self._thread.start()

    def submit(
        self,
        handle: ModelHandle,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> GenerationStream:
        """Queue a request; raises :class:`QueueFullError`, :class:`EngineStoppedError` or
        :class:`EngineDeadError` at once."""
        return self.submit_choices(handle, prompt_ids, params, 1, request_id)[0]

    def submit_choices(
        self,
        handle: ModelHandle,
        prompt_ids: list[int],
        params: SamplingParams,
        n: int,
        request_id: str | None = None,
    ) -> list[GenerationStream]:
        """Queue ``n`` independent choices of one prompt, one stream each: admitted together (they
        take ``n`` batch slots, and count ``n`` against the queue limit), prefilled once, sampled
        independently (with ``params.seed`` set, choice ``i`` samples with seed ``seed + i``).

        Raises ValueError if ``n`` is outside ``1..max_running``, else as :meth:`submit`."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if not 1 <= n <= self.max_running:
            raise ValueError(f"n must be between 1 and {self.max_running}")
        request_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        prompt = list(prompt_ids)  # one list for all choices: the batch prefills it once
        now = time.monotonic()
        seqs = [
            Sequence(
                request_id=request_id,
                handle=handle,
                prompt_ids=prompt,
                params=params if params.seed is None else dataclasses.replace(params, seed=params.seed + i),
                stream=GenerationStream(request_id, self._on_cancel),
                submitted_at=now,
                deadline=now + self.request_timeout_s,
                submitted_wall=time.time(),
            )
            for i in range(n)
        ]
        self._scheduler.add(seqs)
        self._idle.clear()
        for seq in seqs:
            self._output.watch(seq)
        return [seq.stream for seq in seqs]

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting requests, wait up to ``timeout_s`` for those in flight; True if all finished."""
        self._scheduler.close()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Cancel whatever is left and stop the scheduler thread."""
        self._scheduler.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _on_cancel(self, stream: GenerationStream) -> None:
        self._scheduler.wake()

    def _check_idle(self) -> None:
        # Checked on the loop after a delivery, so a racing submit() wins.
        if self._scheduler.outstanding == 0:
            self._idle.set()

    # ----------------------------------------------------------------------------- scheduler thread

    def _run(self, num_threads: int) -> None:
        # While serving, keep torch's work on this thread alone. Any other live thread that has run a
        # parallel region keeps an OpenMP team; with more OpenMP threads than cores, libgomp cuts its
        # spin-wait and every region here waits on a futex (measured: prefill of the benchmark's
        # distinct prompt 124 ms instead of 78 beside the main thread's team). The lifecycle's loading
        # and warm-up threads end with their deployment.
        try:
            torch.set_num_threads(num_threads)  # the setting is per thread for OpenMP builds
            while self._scheduler.wait_for_work(self._runner.busy):
                # Each step is its own call, so no local reference to a handle outlives it.
                with torch.inference_mode():
                    self._step()
            self._shutdown()
        except BaseException as exc:  # nothing may end this thread without the engine saying so
            self._die(exc)

    def _step(self) -> None:
        now = time.monotonic()
        plan = self._scheduler.schedule(now)
        for seq in plan.abandoned:
            self._end(seq, now)
        for handle in self._runner.handles():  # running requests the plan ended
            self._retire(handle)
        for handle, seqs in plan.admitted.items():
            self._prefill(handle, seqs)
        # New requests' first tokens go out now: held for the decode step below, every time to first
        # token carried a whole decode step of the batch (measured: 10 of 55 ms at one stream).
        self._output.flush()
        for handle in self._runner.handles():
            self._decode(handle)
        self._output.flush()

    def _prefill(self, handle: ModelHandle, seqs: list[Sequence]) -> None:
        ready = [seq for seq in seqs if self._admit(handle, seq)]
        outside = [seq for seq in seqs if seq.finished]  # never joined the batch: end them here
        if ready:
            try:
                logits = self._runner.prefill(handle, ready)
            except CacheError as exc:  # the new rows and the batch's other rows are all lost
                self._lose_batch(handle, "cache", exc, also=ready)
            except Exception as exc:  # the batch is unchanged: only these requests end
                self._fail("prefill", ready, exc)
                outside += ready
            else:
                # The choices of one request share a prompt list, prefilled once: count it once.
                prompts = {id(s.prompt_ids): (len(s.prompt_ids), s.cached_tokens) for s in ready}
                cached = sum(c for _, c in prompts.values()) if self._runner.prefix_cache_budget else None
                self._metrics.prefilled(handle.info.model_id, sum(n for n, _ in prompts.values()), cached)
                self._emit(handle, ready, logits)
                self._keep_prefixes(lambda: self._runner.remember_prompts(handle, ready, logits))
        now = time.monotonic()
        for seq in outside:
            self._end(seq, now)
        self._retire(handle)

    def _admit(self, handle: ModelHandle, seq: Sequence) -> bool:
        try:
            self._runner.admit(handle, seq)
            return True
        except ValueError as exc:  # the request's own fault: its prompt leaves no room in the context
            seq.finish(FinishReason.ERROR, str(exc))
        except Exception as exc:  # e.g. a handle whose model was torn down
            self._fail("admit", [seq], exc)
        return False

    def _decode(self, handle: ModelHandle) -> None:
        try:
            seqs, logits = self._runner.decode(handle)
        except Exception as exc:  # the shared cache may be half-updated: the whole batch is lost
            self._lose_batch(handle, "decode", exc)
            return
        self._metrics.decoded(len(seqs))
        self._emit(handle, seqs, logits)
        self._retire(handle)

    def _emit(self, handle: ModelHandle, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence and hand it to the output processor."""
        try:
            tokens = self._runner.sample(logits, seqs)
            logprobs = self._runner.logprobs(logits, seqs, tokens)
        except Exception as exc:  # e.g. infinite probabilities from a broken model
            self._fail("sample", seqs, exc)
            return
        eos_ids = self._runner.eos_ids(handle)
        now = time.monotonic()
        emitted = 0
        for seq, token, scored in zip(seqs, tokens, logprobs, strict=True):
            if isinstance(token, Exception):  # NaN logits or a logits processor raised, in this row alone
                self._fail("sample", [seq], token)
                continue
            emitted += 1
            try:
                self._output.emit(seq, token, token in eos_ids, now, scored)
            except Exception as exc:  # the tokenizer failed on this request's text
                self._fail("detokenize", [seq], exc)
        self._metrics.generated(handle.info.model_id, emitted)

    def _retire(self, handle: ModelHandle) -> None:
        """End the sequences of ``handle`` that finished, cutting them out of the batch."""
        self._keep_prefixes(lambda: self._runner.remember_finished(handle))
        try:
            done = self._runner.retire(handle)
        except Exception as exc:  # the cache surgery failed midway: the whole batch is lost
            self._lose_batch(handle, "cache", exc)
            return
        now = time.monotonic()
        for seq in done:
            self._end(seq, now)

    def _keep_prefixes(self, remember: Callable[[], None]) -> None:
        """Fill the prefix cache; a failure (say, no memory for the copy) loses those entries only."""
        try:
            remember()
        except Exception as exc:
            log.error("prefix cache entries not kept; requests go on", exc_info=exc)
            self._metrics.step_failed("prefix_cache")

    def _lose_batch(
        self, handle: ModelHandle, stage: str, exc: Exception, also: list[Sequence] | None = None
    ) -> None:
        """``handle``'s batch is unusable: drop it, end its requests (unfinished ones with an error)."""
        seqs = [*self._runner.drop(handle), *(also or [])]
        self._fail(stage, [seq for seq in seqs if not seq.finished], exc)
        now = time.monotonic()
        for seq in seqs:
            self._end(seq, now)

    def _fail(self, stage: str, seqs: list[Sequence], exc: Exception) -> None:
        """The crash barrier: a failure in ``stage`` ends ``seqs`` with an error, and nothing else."""
        log.error(
            "engine step failed; its requests end with an error",
            exc_info=exc,
            extra={"stage": stage, "request_ids": [seq.request_id for seq in seqs]},
        )
        self._metrics.step_failed(stage)
        for seq in seqs:
            seq.finish(FinishReason.ERROR, f"generation failed ({stage}): {exc}")

    def _end(self, seq: Sequence, now: float) -> None:
        """Deliver the tail text and the result of a finished ``seq``, and free its place."""
        try:
            self._output.release_tail(seq)
        except Exception as exc:
            self._fail("detokenize", [seq], exc)
        self._output.finish(seq, now)
        self._scheduler.release(seq, now)

    def _shutdown(self) -> None:
        """Cancel everything left (the engine is stopping) and drop every handle."""
        leftovers = self._scheduler.take_waiting()
        for handle in self._runner.handles():
            leftovers += self._runner.drop(handle)
        now = time.monotonic()
        for seq in leftovers:
            seq.finish(FinishReason.CANCELLED, "the server is shutting down")
            self._end(seq, now)
        self._output.flush()

    def _die(self, exc: BaseException) -> None:
        """The thread is ending on an error that escaped the barrier: refuse new requests and end
        every outstanding one with an error (the deadline backstop covers a failure in here)."""
        reason = f"{type(exc).__name__}: {exc}"
        outstanding = self._scheduler.kill(reason)
        log.critical(
            "engine scheduler thread died; new requests get 503 until a restart",
            exc_info=exc,
            extra={"reason": reason, "requests_ended": len(outstanding)},
        )
        self._runner.clear()
        now = time.monotonic()
        for seq in outstanding:
            seq.finish(FinishReason.ERROR, f"the generation engine stopped: {reason}")
            self._output.finish(seq, now)
        self._output.flush()
