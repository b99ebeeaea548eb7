"""The engine's public vocabulary: what a request asks for and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.engine.grammar import Grammar


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the client went away
    TIMEOUT = "timeout"  # request_timeout_s elapsed
    ERROR = "error"  # the model raised; the message says why


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; honoured per sequence inside a shared batch."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Logits processors (service.engine.logits), in the order they apply.
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its score)
    repetition_penalty: float = 1.0  # 1 is none; over prompt and output tokens
    frequency_penalty: float = 0.0  # per occurrence in the output
    presence_penalty: float = 0.0  # once per token present in the output
    grammar: Grammar | None = None  # constrained decoding (applied last): only what it allows next
    # Logprobs from the raw model distribution (before processors, temperature and top-p).
    logprobs: int | None = None  # None: none; k: each generated token's, with the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first


@dataclass(frozen=True)
class Logprob:
    """One token and its log-probability (natural log) under the raw model distribution."""

    token_id: int
    token: str  # the token decoded on its own (a partial UTF-8 character decodes as U+FFFD)
    logprob: float
    bytes: tuple[int, ...]  # the token's own bytes (a byte-level token's, even a partial character's)


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token of one position, and the ``k`` most likely tokens there, most likely first."""

    chosen: Logprob
    top: tuple[Logprob, ...]


@dataclass(frozen=True)
class TokenDelta:
    """New text of one request since its previous delta (may be empty while a stop string is pending).

    ``logprobs`` is aligned with ``token_ids`` when the request asked for logprobs, else empty;
    the first delta of a request that asked for prompt logprobs carries them (as the result does)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] = ()
    prompt_logprobs: tuple[TokenLogprobs | None, ...] = ()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, taken from the prefix cache (OpenAI's prompt_tokens_details)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestTimings:
    """Where one request's time went, in seconds (llama.cpp's ``timings``, vLLM's request metrics).

    ``submitted_at`` is wall-clock (``time.time()``) so spans and logs can place the request;
    the durations come from ``time.monotonic()``. ``prefill_s`` runs from admission to the first
    token, ``decode_s`` from the first token to the last; a request that never got a token has
    ``ttft_s`` None and zero ``prefill_s``/``decode_s`` past its queue time.
    """

    submitted_at: float
    queue_s: float
    prefill_s: float
    ttft_s: float | None
    decode_s: float
    total_s: float
    prompt_tokens: int
    completion_tokens: int

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, over the decode time (None with fewer than two tokens)."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.completion_tokens - 1) / self.decode_s


@dataclass
class GenerationResult:
    """How a request ended: the whole text, why it stopped, its token counts and timings.

    ``logprobs`` (one per generated token) and ``prompt_logprobs`` (None for the first prompt token,
    which nothing predicts) are set when the request's :class:`SamplingParams` asked for them."""

    text: str
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    timings: RequestTimings | None = None
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class EngineError(Exception):
    """Base class of errors the engine raises at submission time."""


class QueueFullError(EngineError):
    """The waiting queue is at ``max_queued_requests``; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after_s = retry_after_s


class EngineStoppedError(EngineError):
    """The engine is draining for shutdown and takes no new requests."""


class EngineDeadError(EngineError):
    """The scheduler thread has died (``reason`` says why); only a restart brings generation back."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the generation engine has stopped: {reason}")
        self.reason = reason
