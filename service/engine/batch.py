"""The running sequences of one model handle and their shared KV cache.

One ``DynamicCache`` holds every row, left-padded to a common length, with a 2-D attention mask
marking the padding (the layout ``generate`` uses for a padded batch). New sequences are
prefilled on their own cache, then spliced in; finished rows are cut out and all-padding
columns trimmed, so a long-gone long prompt does not keep costing attention.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from service.engine.logits import RawLogprobs, position_logprobs
from service.engine.prefix_cache import PrefixCache, PrefixHit
from service.engine.sequence import Sequence
from service.engine.types import FinishReason
from service.handle import ModelHandle


class CacheError(Exception):
    """The KV-cache surgery of a batch failed midway: every row of that batch is lost."""


@dataclass
class _Prefilled:
    """One prefill forward pass: row ``i`` of ``cache``, ``mask`` and ``logits`` is ``prompts[i]``."""

    prompts: list[list[int]]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns], 0 on left padding
    logits: torch.Tensor  # [rows, vocab], the next token's


class HandleBatch:
    """Sequences of one :class:`ModelHandle` that share each forward pass."""

    def __init__(self, handle: ModelHandle, prefixes: PrefixCache | None = None) -> None:
        self.handle = handle
        self.prefixes = prefixes  # where prompts and finished sequences leave their KV for reuse
        self.device: torch.device = handle.model.device
        self.eos_ids = _eos_ids(handle)
        self.context_length = handle.info.context_length or getattr(
            handle.model.config, "max_position_embeddings", None
        )
        self._cache_kwarg = cache_kwarg(handle.model)
        self.seqs: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, columns], 0 on left padding

    def __len__(self) -> int:
        return len(self.seqs)

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Run the prompts of ``seqs`` and add them as new rows; return their next-token logits
        ``[len(seqs), vocab]``, in the order of ``seqs``.

        Sequences with the same prompt (the ``n`` choices of a request, or requests that came together
        with the same text) are prefilled once: the forward pass runs over the distinct prompts, then
        their KV rows and logits are copied to every sequence of the prompt. A prompt whose beginning is
        in the prefix cache runs only the rest, on a copy of the cached keys and values, and nothing if
        it was prefilled whole before (its sequences' ``cached_tokens`` say how many tokens that
        skipped); the others are prefilled together, left-padded. A sequence asking for
        ``prompt_logprobs`` gets them set here (its prompt runs whole: the cache keeps no logits).

        The batch is left unchanged if a forward pass raises; :class:`CacheError` if splicing the new
        rows into the shared cache failed (the other rows' cache may be broken too).
        """
        keys = {id(s): tuple(s.prompt_ids) for s in seqs}
        prompts = {keys[id(s)]: s.prompt_ids for s in seqs}
        scored = any(s.params.prompt_logprobs is not None for s in seqs)
        hits = {}
        if self.prefixes is not None and not scored:
            hits = {key: hit for key, p in prompts.items() if (hit := self.prefixes.lookup(p)) is not None}
        # Prompts with as many tokens left to run (none: a whole hit) share one forward pass.
        rest: dict[int, list[tuple[list[int], PrefixHit]]] = {}
        for key, hit in hits.items():
            rest.setdefault(len(key) - hit.length, []).append((prompts[key], hit))
        parts = [self._prefill_after(group) for group in rest.values()]
        if cold := [p for key, p in prompts.items() if key not in hits]:
            parts.append(self._prefill_padded(cold, seqs, scored))
        for seq in seqs:
            hit = hits.get(keys[id(seq)])
            seq.cached_tokens = 0 if hit is None else hit.length
        logits = {tuple(p): part.logits[row] for part in parts for row, p in enumerate(part.prompts)}
        added: list[Sequence] = []
        try:
            for part in parts:
                rows = {tuple(p): row for row, p in enumerate(part.prompts)}
                mine = [s for s in seqs if keys[id(s)] in rows]
                if len(mine) > len(part.prompts):  # a prompt of several sequences: copy its row
                    index = torch.tensor([rows[keys[id(s)]] for s in mine], device=self.device)
                    for layer in part.cache.layers:
                        layer.keys, layer.values = layer.keys[index], layer.values[index]
                    part.mask = part.mask[index]
                self._splice(part.cache, part.mask)
                added += mine
        except Exception as exc:
            raise CacheError(f"splicing {len(seqs)} new rows into the KV cache failed: {exc}") from exc
        self.seqs.extend(added)
        return torch.stack([logits[keys[id(s)]] for s in seqs])

    def _prefill_padded(self, prompts: list[list[int]], seqs: list[Sequence], scored: bool) -> _Prefilled:
        """One forward pass over ``prompts``, left-padded to a common length, on a new cache."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.handle.model.config)
        out = self.handle.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=_positions(mask),
            **{self._cache_kwarg: cache},
            use_cache=True,
            # The lm head over the whole prompt costs more than the prompt itself: only when asked.
            logits_to_keep=0 if scored else 1,
        )
        _check_layers(cache)
        if scored:
            rows = {tuple(p): row for row, p in enumerate(prompts)}
            for seq in seqs:
                if seq.params.prompt_logprobs is not None:
                    seq.prompt_logprobs = _prompt_logprobs(
                        out.logits[rows[tuple(seq.prompt_ids)], width - len(seq.prompt_ids) :],
                        seq.prompt_ids,
                        seq.params.prompt_logprobs,
                    )
        return _Prefilled(prompts, cache, mask, out.logits[:, -1, :])

    def _prefill_after(self, group: list[tuple[list[int], PrefixHit]]) -> _Prefilled:
        """Prompts past their cached first ``hit.length`` tokens, each with as many tokens left, on one
        cache that starts with the cached keys and values (left-padded to a common length): no forward
        pass for whole hits (the cache kept their logits), a decode step for one token left (the fused
        one where there is one), the model's forward for more."""
        prompts, hits = [p for p, _ in group], [h for _, h in group]
        past = max(h.length for h in hits)
        cache = DynamicCache(config=self.handle.model.config)
        for layer in range(len(hits[0].keys)):  # copies: the cached tensors stay as they are
            keys = torch.stack([_left_pad(h.keys[layer], past - h.length) for h in hits])
            values = torch.stack([_left_pad(h.values[layer], past - h.length) for h in hits])
            cache.update(keys, values, layer)
        left = len(prompts[0]) - hits[0].length
        mask = torch.zeros((len(group), past + left), dtype=torch.long)
        for row, hit in enumerate(hits):
            mask[row, past - hit.length :] = 1
        mask = mask.to(self.device)
        if not left:
            return _Prefilled(prompts, cache, mask, torch.stack([h.logits for h in hits]))
        ids = torch.tensor([p[h.length :] for p, h in group], device=self.device)
        positions = torch.tensor([list(range(h.length, h.length + left)) for h in hits], device=self.device)
        fused = self.handle.decode_step
        if fused is not None and left == 1 and len(group) <= fused.max_rows:
            return _Prefilled(prompts, cache, mask, fused(ids, mask, positions, cache))
        out = self.handle.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self._cache_kwarg: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return _Prefilled(prompts, cache, mask, out.logits[:, -1, :])

    def decode(self) -> torch.Tensor:
        """Feed every row its last generated token; return next-token logits ``[rows, vocab]``."""
        assert self._cache is not None and self._mask is not None
        ids = torch.tensor([[s.output_ids[-1]] for s in self.seqs], device=self.device)
        self._mask = F.pad(self._mask, (0, 1), value=1)
        fused = self.handle.decode_step
        if fused is not None and len(self.seqs) <= fused.max_rows:
            return fused(ids, self._mask, _positions(self._mask)[:, -1:], self._cache)
        out = self.handle.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=_positions(self._mask)[:, -1:],
            **{self._cache_kwarg: self._cache},
            use_cache=True,
        )
        return out.logits[:, -1, :]

    def remove_finished(self) -> list[Sequence]:
        """Cut finished rows out of the batch and its cache; return them."""
        done = [s for s in self.seqs if s.finished]
        if not done:
            return done
        keep = [row for row, s in enumerate(self.seqs) if not s.finished]
        if not keep:
            self.seqs, self._cache, self._mask = [], None, None
            return done
        assert self._cache is not None and self._mask is not None
        rows = torch.tensor(keep, device=self.device)
        self._mask = self._mask[rows]
        # Columns that are padding in every remaining row carry nothing: drop them.
        first = int(self._mask.any(dim=0).int().argmax())
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[rows, :, first:]
            layer.values = layer.values[rows, :, first:]
        # Last: if the surgery above raises, ``seqs`` still names every row the broken cache held.
        self.seqs = [self.seqs[row] for row in keep]
        return done

    def remember_prompts(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Leave the KV of just-prefilled ``seqs`` (rows of this batch) and their next-token ``logits``
        ``[len(seqs), vocab]`` in the prefix cache (a prompt already there is only marked as used). Call
        before their first decode step: a new row's last ``len(prompt)`` columns are then its prompt's."""
        assert self.prefixes is not None and self._cache is not None
        rows = {id(seq): row for row, seq in enumerate(self.seqs)}
        for seq, next_token in zip(seqs, logits, strict=True):
            kv = _row_kv(self._cache, rows[id(seq)], len(seq.prompt_ids))
            self.prefixes.insert(seq.prompt_ids, *kv, next_token)

    def remember_finished(self) -> None:
        """Leave the KV of finished rows in the prefix cache (the next turn of a chat resends it); call
        before :meth:`remove_finished` cuts them out."""
        assert self.prefixes is not None
        if self._cache is None or self._mask is None or not any(s.finished for s in self.seqs):
            return
        lengths = self._mask.sum(dim=1).tolist()
        for row, seq in enumerate(self.seqs):
            # The last sampled token was never fed back: the cache holds everything before it.
            ids = seq.prompt_ids + seq.output_ids[:-1]
            if seq.finished and seq.finish_reason is not FinishReason.ERROR and len(ids) == lengths[row]:
                self.prefixes.insert(ids, *_row_kv(self._cache, row, len(ids)))

    @property
    def cache_tokens(self) -> int:
        """Token positions the KV cache holds (rows x columns, left padding included)."""
        mask = self._mask  # read from the scrape thread: one attribute load, no lock
        return 0 if mask is None else mask.numel()

    def _splice(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        pad_old, pad_new = width - self._mask.shape[1], width - mask.shape[1]
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, pad_old), _left_pad(new.keys, pad_new)])
            old.values = torch.cat([_left_pad(old.values, pad_old), _left_pad(new.values, pad_new)])
        self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name ``model.forward`` takes its KV cache by: transformers >= 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[RawLogprobs | None]:
    """Logprobs of each prompt token given the ones before it, from ``logits`` ``[len(prompt), vocab]``
    (row ``i`` predicts token ``i + 1``); None for the first token."""
    logprobs = logits[:-1].float().log_softmax(-1)
    return [None, *(position_logprobs(logprobs[i], prompt[i + 1], k) for i in range(len(prompt) - 1))]


def _check_layers(cache: DynamicCache) -> None:
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        # Sliding-window and other special layers keep state that left-padding would corrupt.
        raise NotImplementedError("batching needs a model whose cache layers are all full-attention")


def _row_kv(cache: DynamicCache, row: int, tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values ``[kv_heads, tokens, head_dim]`` of ``row``'s last ``tokens`` columns
    (views; a row's real tokens are its rightmost columns, padding is on the left)."""
    return (
        [layer.keys[row, :, -tokens:] for layer in cache.layers],
        [layer.values[row, :, -tokens:] for layer in cache.layers],
    )


def _left_pad(kv: torch.Tensor, columns: int) -> torch.Tensor:
    """Pad a cache tensor (``[..., columns, head_dim]``) with ``columns`` zero columns on the left."""
    return F.pad(kv, (0, 0, columns, 0)) if columns else kv


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of each column within its row's real tokens (padding gets 0; it is masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _eos_ids(handle: ModelHandle) -> frozenset[int]:
    if handle.eos_token_ids:
        return handle.eos_token_ids
    eos = handle.model.generation_config.eos_token_id
    if eos is None:
        eos = handle.tokenizer.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else eos or [])
