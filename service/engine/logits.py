"""Per-sequence logits processing: what changes a row of next-token scores before it is sampled.

Every :class:`~service.engine.sequence.Sequence` carries ``logits_processors``, built once at
admission by :func:`processors_for`; the model runner calls :func:`apply_logits_processors` on each
step's logits, just before sampling. This is the single place where a request's own rules act on
its scores, inside a shared batch (each row gets only its own sequence's processors).

A processor is a callable ``(output_ids, scores) -> scores``: ``output_ids`` the tokens generated so
far (a list of ints, read only), ``scores`` one float32 row ``[vocab]`` it may change in place, and
it returns the row to use. A stateful processor (e.g. a grammar matcher) advances itself from the
tokens in ``output_ids`` it has not seen yet. To add one kind, build it in :func:`processors_for`.

Order, as vLLM's sampler applies them: ``logit_bias``, then the repetition, frequency and presence
penalties, then the grammar's token mask (structured outputs, tool calls); temperature and top-p
come later, in :mod:`service.engine.sampling`. Logprobs are read from the raw model distribution,
before any of this (vLLM's default ``raw_logprobs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from service.engine.grammar import grammar_processor

if TYPE_CHECKING:
    from service.engine.sequence import Sequence

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


def processors_for(seq: Sequence) -> list[LogitsProcessor]:
    """The processors ``seq``'s sampling parameters ask for (empty for plain sampling)."""
    params = seq.params
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        processors.append(_logit_bias(params.logit_bias))
    if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        processors.append(
            _penalties(
                seq.prompt_ids, params.repetition_penalty, params.frequency_penalty, params.presence_penalty
            )
        )
    if params.grammar is not None:
        processors.append(grammar_processor(params.grammar))
    return processors


def apply_logits_processors(
    logits: torch.Tensor, seqs: list[Sequence]
) -> tuple[torch.Tensor, dict[int, Exception]]:
    """``logits`` ``[rows, vocab]`` with each row passed through its sequence's processors (the
    same tensor when no row has any; else a float32 copy), and the rows whose processors raised,
    with what they raised: those rows must not be sampled, and only their requests end."""
    rows = [row for row, seq in enumerate(seqs) if seq.logits_processors]
    if not rows:
        return logits, {}
    logits = logits.to(torch.float32, copy=True)  # the rows are changed in place below
    failed: dict[int, Exception] = {}
    for row in rows:
        seq = seqs[row]
        scores = logits[row]
        try:
            for processor in seq.logits_processors:
                scores = processor(seq.output_ids, scores)
        except Exception as exc:  # e.g. a grammar matcher in a state it cannot mask from
            failed[row] = exc
            continue
        logits[row] = scores
    return logits, failed


def _logit_bias(bias: tuple[tuple[int, float], ...]) -> LogitsProcessor:
    ids = torch.tensor([token for token, _ in bias], dtype=torch.long)
    values = torch.tensor([value for _, value in bias], dtype=torch.float32)

    def add_bias(output_ids: list[int], scores: torch.Tensor) -> torch.Tensor:
        scores[ids.to(scores.device)] += values.to(scores.device)
        return scores

    return add_bias


def _penalties(
    prompt_ids: list[int], repetition: float, frequency: float, presence: float
) -> LogitsProcessor:
    """vLLM's penalties: repetition over prompt and output tokens (divides a positive score,
    multiplies a negative one), frequency per occurrence and presence once, over output tokens."""
    prompt = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)

    def penalize(output_ids: list[int], scores: torch.Tensor) -> torch.Tensor:
        output = torch.tensor(output_ids, dtype=torch.long, device=scores.device)
        if repetition != 1.0:
            seen = torch.cat([prompt.to(scores.device), output]).unique()
            picked = scores[seen]
            scores[seen] = torch.where(picked > 0, picked / repetition, picked * repetition)
        if output_ids and (frequency or presence):
            counts = torch.bincount(output, minlength=scores.shape[-1])[: scores.shape[-1]].float()
            scores -= frequency * counts + presence * (counts > 0).float()
        return scores

    return penalize


#: One position's logprobs as numbers: ``(token id, logprob)`` of the chosen token, then the top k.
RawLogprobs = tuple[tuple[int, float], ...]


def position_logprobs(logprobs: torch.Tensor, token: int, k: int) -> RawLogprobs:
    """``token``'s entry and the ``k`` largest of one position's ``logprobs`` row ``[vocab]``."""
    values, ids = logprobs.topk(k) if k else (logprobs[:0], logprobs[:0].long())
    return ((token, float(logprobs[token])), *zip(ids.tolist(), values.tolist(), strict=True))
