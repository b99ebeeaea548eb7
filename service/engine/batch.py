"""The running sequences of one model handle and their shared KV cache.

One ``DynamicCache`` holds every row, left-padded to a common length, with a 2-D attention mask
marking the padding (the layout ``generate`` uses for a padded batch). New sequences are
prefilled on their own cache, then spliced in; finished rows are cut out and all-padding
columns trimmed, so a long-gone long prompt does not keep costing attention.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from service.engine.logits import RawLogprobs, position_logprobs
from service.engine.sequence import Sequence
from service.handle import ModelHandle


class CacheError(Exception):
    """The KV-cache surgery of a batch failed midway: every row of that batch is lost."""


class HandleBatch:
    """Sequences of one :class:`ModelHandle` that share each forward pass."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
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
        """Run the prompts of ``seqs`` and add them as new rows; return their next-token logits.

        Sequences that share one prompt list (the ``n`` choices of a request) are prefilled once: the
        forward pass runs over the distinct prompts, then their KV rows and logits are copied to every
        sequence of the prompt. A sequence asking for ``prompt_logprobs`` gets them set here.

        The batch is left unchanged if the forward pass raises; :class:`CacheError` if splicing the new
        rows into the shared cache failed (the other rows' cache may be broken too).
        """
        prompts: dict[int, int] = {}  # id of a prompt list -> its row in the forward pass
        rows = [prompts.setdefault(id(s.prompt_ids), len(prompts)) for s in seqs]
        unique = list({id(s.prompt_ids): s.prompt_ids for s in seqs}.values())
        width = max(len(p) for p in unique)
        ids = torch.zeros((len(unique), width), dtype=torch.long)
        mask = torch.zeros((len(unique), width), dtype=torch.long)
        for row, prompt in enumerate(unique):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.handle.model.config)
        scored = any(s.params.prompt_logprobs is not None for s in seqs)
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
            for seq, row in zip(seqs, rows, strict=True):
                if seq.params.prompt_logprobs is not None:
                    seq.prompt_logprobs = _prompt_logprobs(
                        out.logits[row, width - len(seq.prompt_ids) :],
                        seq.prompt_ids,
                        seq.params.prompt_logprobs,
                    )
        index = torch.tensor(rows, device=self.device)
        try:
            if len(unique) < len(seqs):
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[index], layer.values[index]
            self._splice(cache, mask[index])
        except Exception as exc:
            raise CacheError(f"splicing {len(seqs)} new rows into the KV cache failed: {exc}") from exc
        self.seqs.extend(seqs)
        return out.logits[index, -1, :]

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


def _left_pad(kv: torch.Tensor, columns: int) -> torch.Tensor:
    """Pad a ``[rows, heads, columns, head_dim]`` cache tensor with ``columns`` zero columns on the left."""
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
