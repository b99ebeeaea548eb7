"""One request inside the engine: its prompt, sampling state, generated tokens and text."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.engine.logits import LogitsProcessor, RawLogprobs, processors_for
from service.engine.stream import GenerationStream
from service.engine.text import IncrementalDetokenizer, StopStringMatcher
from service.engine.types import (
    FinishReason,
    GenerationResult,
    RequestTimings,
    SamplingParams,
    TokenLogprobs,
    Usage,
)
from service.handle import ModelHandle


@dataclass(eq=False)
class Sequence:
    """Engine-internal state of one request; dropped (with its handle reference) once it finishes."""

    request_id: str
    handle: ModelHandle
    prompt_ids: list[int]
    params: SamplingParams
    stream: GenerationStream
    submitted_at: float  # time.monotonic()
    deadline: float
    submitted_wall: float = 0.0  # time.time() at submission, for logs and spans
    admitted_at: float | None = None  # time.monotonic() when it got a batch slot
    max_new_tokens: int = 0  # set at admission: params.max_tokens capped by the context length
    generator: torch.Generator | None = None  # per-request, so a seeded request is reproducible
    # Applied to this sequence's logits row before sampling (set at admission; see engine.logits).
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per output token, when asked
    prompt_logprobs: list[RawLogprobs | None] | None = None  # set by the prefill, when asked
    cached_tokens: int = 0  # prompt tokens the prefill took from the prefix cache instead of computing
    prompt_scored: list[TokenLogprobs | None] | None = None  # the same decoded, with the first token
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    _detokenizer: IncrementalDetokenizer | None = None
    _matcher: StopStringMatcher = field(init=False)

    def __post_init__(self) -> None:
        self._matcher = StopStringMatcher(self.params.stop)

    def admit(self, device: torch.device, context_length: int | None) -> None:
        """Prepare to generate on ``device``: the sampling generator, the detokenizer and the token budget."""
        budget = self.params.max_tokens
        if context_length is not None:
            budget = min(budget, context_length - len(self.prompt_ids))
        if budget <= 0:
            raise ValueError(
                f"the prompt ({len(self.prompt_ids)} tokens) leaves no room in the context ({context_length})"
            )
        self.max_new_tokens = budget
        if self.params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if self.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.params.seed)
        self.logits_processors = processors_for(self)
        self._detokenizer = IncrementalDetokenizer(self.handle.tokenizer, self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token_id: int, is_eos: bool) -> str:
        """Record a generated token; return the text it releases. Sets ``finish_reason`` if it ends here."""
        assert self._detokenizer is not None, "admit() first"
        self.output_ids.append(token_id)
        if is_eos:
            self.finish_reason = FinishReason.STOP
            return self.release_tail()
        try:
            piece = self._detokenizer.push(token_id)
        except Exception:
            self._detokenizer = None  # its state is unknown now: release nothing more from it
            raise
        text, stopped = self._matcher.push(piece)
        if stopped:
            self.finish_reason = FinishReason.STOP
        elif len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
            text += self.release_tail()
        return text

    def release_tail(self) -> str:
        """Text held back (incomplete characters, a possible stop-string start), released at the end."""
        if self._detokenizer is None:
            return ""
        text, stopped = self._matcher.push(self._detokenizer.flush())
        if stopped:
            self.finish_reason = FinishReason.STOP
            return text
        return text + self._matcher.flush()

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.finish_reason = reason
        self.error = error

    @property
    def text(self) -> str:
        """The completion so far, cut at a stop string."""
        return self._matcher.text

    def timings(self, now: float) -> RequestTimings:
        """Where the time went, for a request ending at ``now`` (``time.monotonic()``)."""
        started = self.admitted_at if self.admitted_at is not None else now
        first, last = self.first_token_at, self.last_token_at
        return RequestTimings(
            submitted_at=self.submitted_wall,
            queue_s=started - self.submitted_at,
            prefill_s=0.0 if first is None else first - started,
            ttft_s=None if first is None else first - self.submitted_at,
            decode_s=0.0 if first is None or last is None else last - first,
            total_s=now - self.submitted_at,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
        )

    def result(
        self, now: float, reason: FinishReason | None = None, error: str | None = None
    ) -> GenerationResult:
        """How the request ended at ``now``; ``reason``/``error`` describe an end decided off the
        scheduler thread (the deadline backstop) without touching this sequence's state."""
        reason = reason or self.finish_reason
        assert reason is not None
        return GenerationResult(
            text=self.text,
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.output_ids),
                cached_tokens=self.cached_tokens,
            ),
            error=error or self.error,
            timings=self.timings(now),
            logprobs=None if self.params.logprobs is None else list(self.logprobs),
            prompt_logprobs=self.prompt_scored,
        )
