"""The model runner: executes a step's plan on the models (batches, KV caches, forward, sampling).

One :class:`~service.engine.batch.HandleBatch` per model handle; sequences of different handles
never share a forward pass. A handle's batch is forgotten (with its KV cache) as soon as its last
sequence leaves; its prefix cache lives as long as the handle, so a swapped-out model's goes with it.
Runs on the scheduler thread only; its methods raise and leave it to the engine to decide which
requests a failure ends.
"""

from __future__ import annotations

import weakref

import torch

from service.engine.batch import HandleBatch
from service.engine.logits import RawLogprobs, apply_logits_processors, position_logprobs
from service.engine.prefix_cache import PrefixCache
from service.engine.sampling import sample_next_tokens
from service.engine.sequence import Sequence
from service.handle import ModelHandle


class ModelRunner:
    """The running sequences of every handle, and the forward passes over them."""

    def __init__(self, prefix_cache_bytes: int = 0) -> None:
        """``prefix_cache_bytes``: the budget of each model handle's prefix cache; 0 turns it off."""
        self.prefix_cache_budget = prefix_cache_bytes
        self._batches: dict[ModelHandle, HandleBatch] = {}
        # id(handle) -> its prefix cache, dropped when the handle is collected. A plain dict, not a
        # WeakKeyDictionary, because the scrape thread sums it while the scheduler thread adds to it.
        self._prefixes: dict[int, PrefixCache] = {}

    @property
    def busy(self) -> bool:
        return bool(self._batches)

    @property
    def cache_tokens(self) -> int:
        """Token positions held in all KV caches now (read at scrape time, from another thread)."""
        return sum(batch.cache_tokens for batch in list(self._batches.values()))

    @property
    def prefix_cache_held(self) -> int:
        """Bytes of keys and values the prefix caches hold now (read at scrape time, from another thread)."""
        return sum(cache.nbytes for cache in list(self._prefixes.values()))

    def handles(self) -> list[ModelHandle]:
        return list(self._batches)

    def eos_ids(self, handle: ModelHandle) -> frozenset[int]:
        return self._batches[handle].eos_ids

    def admit(self, handle: ModelHandle, seq: Sequence) -> None:
        """Prepare ``seq`` to run on ``handle`` (creating its batch on first use). Raises ValueError if
        the prompt leaves no room in the context; anything else if the handle is unusable."""
        batch = self._batches.get(handle)
        if batch is None:
            batch = HandleBatch(handle, self._prefix_cache(handle))
            self._batches[handle] = batch
        seq.admit(batch.device, batch.context_length)

    def _prefix_cache(self, handle: ModelHandle) -> PrefixCache | None:
        if not self.prefix_cache_budget:
            return None
        cache = self._prefixes.get(id(handle))
        if cache is None:
            cache = self._prefixes[id(handle)] = PrefixCache(self.prefix_cache_budget)
            weakref.finalize(handle, self._prefixes.pop, id(handle), None)
        return cache

    def prefill(self, handle: ModelHandle, seqs: list[Sequence]) -> torch.Tensor:
        """Run the prompts of admitted ``seqs`` and add them to the batch; next-token logits per row.
        Raises :class:`~service.engine.batch.CacheError` if the batch's cache was damaged."""
        return self._batches[handle].prefill(seqs)

    def remember_prompts(self, handle: ModelHandle, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Copy the prompts of just-prefilled ``seqs`` and their next-token ``logits`` (one row each) into
        ``handle``'s prefix cache. A failure loses those entries only: the batch is not touched."""
        batch = self._batches.get(handle)
        if batch is not None and batch.prefixes is not None:
            batch.remember_prompts(seqs, logits)

    def remember_finished(self, handle: ModelHandle) -> None:
        """Copy the finished sequences of ``handle``'s batch into its prefix cache; before :meth:`retire`.
        A failure loses those entries only: the batch is not touched."""
        batch = self._batches.get(handle)
        if batch is not None and batch.prefixes is not None:
            batch.remember_finished()

    def decode(self, handle: ModelHandle) -> tuple[list[Sequence], torch.Tensor]:
        """One decode step for every row of ``handle``'s batch: its sequences and their logits. After an
        exception the batch's cache may be half-updated: :meth:`drop` it."""
        batch = self._batches[handle]
        return list(batch.seqs), batch.decode()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | Exception]:
        """One token per row, after each row's logits processors; in place of the token, the error of
        a row whose processors raised or whose logits hold NaN (that request alone must end)."""
        logits, failed = apply_logits_processors(logits, seqs)
        for row in torch.isnan(logits).any(dim=-1).nonzero().flatten().tolist():
            failed.setdefault(row, FloatingPointError("the model produced NaN logits"))
        if not failed:
            return list(sample_next_tokens(logits, seqs))
        keep = [row for row in range(len(seqs)) if row not in failed]
        tokens: list[int | Exception] = [failed.get(row, 0) for row in range(len(seqs))]
        if keep:
            sampled = sample_next_tokens(logits[keep], [seqs[row] for row in keep])
            for row, token in zip(keep, sampled, strict=True):
                tokens[row] = token
        return tokens

    def logprobs(
        self, logits: torch.Tensor, seqs: list[Sequence], tokens: list[int | Exception]
    ) -> list[RawLogprobs | None]:
        """For each row whose request asked for logprobs (and got a token): the chosen token's and the
        top k from the raw distribution of ``logits`` (the scores before any logits processor)."""
        rows = [r for r, s in enumerate(seqs) if s.params.logprobs is not None and isinstance(tokens[r], int)]
        out: list[RawLogprobs | None] = [None] * len(seqs)
        if rows:
            logprobs = logits[rows].float().log_softmax(-1)
            for i, row in enumerate(rows):
                token, k = tokens[row], seqs[row].params.logprobs
                assert isinstance(token, int) and k is not None
                out[row] = position_logprobs(logprobs[i], token, k)
        return out

    def retire(self, handle: ModelHandle) -> list[Sequence]:
        """Cut the finished rows out of ``handle``'s batch and cache; return them. After an exception
        the cache may be broken: :meth:`drop` the batch."""
        batch = self._batches.get(handle)
        if batch is None:
            return []
        done = batch.remove_finished()
        if not batch.seqs:
            del self._batches[handle]
        return done

    def drop(self, handle: ModelHandle) -> list[Sequence]:
        """Forget ``handle``'s batch and cache; return the sequences it held."""
        batch = self._batches.pop(handle, None)
        return [] if batch is None else batch.seqs

    def clear(self) -> None:
        self._batches.clear()
        self._prefixes.clear()
