"""Next-token choice per row of a shared batch, each row with its own sampling parameters."""

from __future__ import annotations

import torch

from service.engine.sequence import Sequence


def sample_next_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row of ``logits`` (shape ``[len(seqs), vocab]``): greedy where temperature is 0,
    else temperature + nucleus sampling with the row's own generator."""
    tokens = logits.argmax(dim=-1).tolist()  # one kernel for all greedy rows
    for row, seq in enumerate(seqs):
        if seq.params.temperature > 0:
            tokens[row] = _sample(logits[row], seq.params.temperature, seq.params.top_p, seq.generator)
    return tokens


# Below this a temperature only overflows the scores; the distribution is already one-hot.
_MIN_TEMPERATURE = 1e-4


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    scores = logits.float() / max(temperature, _MIN_TEMPERATURE)
    if top_p >= 1.0:
        return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
    sorted_scores, order = scores.sort(descending=True)
    probs = sorted_scores.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
    outside = (probs.cumsum(-1) - probs) >= top_p
    outside[0] = False  # a top_p that rounds to 0 in float32 must still keep one token
    probs[outside] = 0.0
    return int(order[torch.multinomial(probs, 1, generator=generator)])
