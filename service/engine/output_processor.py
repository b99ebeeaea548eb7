"""The output processor: sampled tokens in, deliveries to the request streams out.

It detokenizes incrementally and applies stop strings (through :class:`Sequence`), builds the
deltas and the final :class:`GenerationResult` with its timings, records the per-token and
per-request metrics, and hands each step's deliveries to the event loop in one wake-up. It also
keeps the deadline backstop: a timer on the event loop that ends a request past its deadline even
when the scheduler thread is stuck in a long step or dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from service.engine.logits import RawLogprobs
from service.engine.sequence import Sequence
from service.engine.stream import GenerationStream
from service.engine.telemetry import EngineMetrics
from service.engine.text import token_bytes
from service.engine.types import FinishReason, GenerationResult, Logprob, TokenDelta, TokenLogprobs

log = logging.getLogger(__name__)

_Delivery = tuple[GenerationStream, TokenDelta | GenerationResult]

#: How long past its deadline the event loop waits for the scheduler to end a request itself.
BACKSTOP_GRACE_S = 1.0


class OutputProcessor:
    """Deltas and results of every request, from the scheduler thread to the event loop."""

    def __init__(self, metrics: EngineMetrics, on_delivered: Callable[[], None]) -> None:
        self._metrics = metrics
        self._on_delivered = on_delivered  # runs on the event loop after each batch of deliveries
        self._outbox: list[_Delivery] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backstops: dict[GenerationStream, asyncio.TimerHandle] = {}  # event loop only

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # ------------------------------------------------------------------ scheduler thread

    def emit(self, seq: Sequence, token: int, is_eos: bool, now: float, logprobs: RawLogprobs | None) -> None:
        """Record ``token`` (and its ``logprobs``, when asked) for ``seq`` and queue the text it
        releases (may raise from the tokenizer)."""
        if seq.first_token_at is None:
            self._metrics.first_token(now - seq.submitted_at)
            seq.first_token_at = now
        elif seq.last_token_at is not None:
            self._metrics.next_token(now - seq.last_token_at)
        seq.last_token_at = now
        text = ""
        scored: tuple[TokenLogprobs, ...] = ()
        prompt_scored: tuple[TokenLogprobs | None, ...] = ()
        try:
            if seq.prompt_logprobs is not None and seq.prompt_scored is None:
                seq.prompt_scored = [p and _decoded(seq, p) for p in seq.prompt_logprobs]
                prompt_scored = tuple(seq.prompt_scored)
            if logprobs is not None:
                scored = (_decoded(seq, logprobs),)
                seq.logprobs.append(scored[0])
            text = seq.add_token(token, is_eos)
        finally:  # the token was generated (and counts in usage) even if its text could not be made
            delta = TokenDelta(text=text, token_ids=(token,), logprobs=scored, prompt_logprobs=prompt_scored)
            self._outbox.append((seq.stream, delta))

    def release_tail(self, seq: Sequence) -> None:
        """Queue the text a finished ``seq`` held back (may raise from the tokenizer)."""
        if seq.finish_reason is FinishReason.CANCELLED:
            return  # nobody is reading
        tail = seq.release_tail()
        if tail:
            self._outbox.append((seq.stream, TokenDelta(text=tail, token_ids=())))

    def finish(self, seq: Sequence, now: float) -> None:
        """Queue the result of a finished ``seq`` and record it."""
        result = seq.result(now)
        if seq.prompt_logprobs is not None:
            try:
                result.prompt_logprobs = [
                    None if p is None else _decoded(seq, p) for p in seq.prompt_logprobs
                ]
            except Exception as exc:  # the tokenizer failed: the result still goes out, with the error
                result.finish_reason, result.error = FinishReason.ERROR, f"decoding prompt logprobs: {exc}"
        self._outbox.append((seq.stream, result))
        self._metrics.finished(result)

    def flush(self) -> None:
        """Hand the queued deltas and results to the event loop in one wake-up."""
        if not self._outbox or self._loop is None:
            return
        deliveries, self._outbox = self._outbox, []
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._deliver, deliveries)

    # ------------------------------------------------------------------ event loop

    def watch(self, seq: Sequence) -> None:
        """Arm the deadline backstop of a just-submitted ``seq``."""
        assert self._loop is not None
        delay = seq.deadline - time.monotonic() + BACKSTOP_GRACE_S
        self._backstops[seq.stream] = self._loop.call_later(delay, self._expire, seq)

    def _expire(self, seq: Sequence) -> None:
        """The deadline passed and the scheduler has not ended ``seq``: end its stream from here."""
        self._backstops.pop(seq.stream, None)
        if seq.stream.ended:
            return
        log.warning("request ended by the deadline backstop", extra={"request_id": seq.request_id})
        seq.stream._put(seq.result(time.monotonic(), FinishReason.TIMEOUT, "the request's deadline passed"))

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        for stream, item in deliveries:
            stream._put(item)
            if isinstance(item, GenerationResult) and (timer := self._backstops.pop(stream, None)):
                timer.cancel()
        self._on_delivered()


def _decoded(seq: Sequence, logprobs: RawLogprobs) -> TokenLogprobs:
    """Token texts for one position's numbers (each token decoded on its own, as vLLM does)."""
    tokenizer = seq.handle.tokenizer

    def entry(token_id: int, value: float) -> Logprob:
        text = tokenizer.decode([token_id])
        return Logprob(token_id, text, value, token_bytes(tokenizer, token_id, text))

    chosen, *top = (entry(token_id, value) for token_id, value in logprobs)
    return TokenLogprobs(chosen, tuple(top))
