"""Automatic prefix caching: the KV cache of past sequences, reused by prompts that start the same way.

A chat client resends the whole conversation every turn, and agent frameworks put the same long system
prompt and tool list in front of every call: prefilling those tokens again costs time to first token,
not quality. vLLM (automatic prefix caching), SGLang (RadixAttention) and llama.cpp's server (each
slot's ``cache_prompt``) all keep the KV of what they already computed; this is the same idea for our
per-batch ``DynamicCache``.

Each entry is one token sequence (a prompt when it is prefilled, then the prompt and its completion
when the request ends) with its keys and values, ``[kv_heads, tokens, head_dim]`` per layer, copied
out of the batch. Entries are found by the chained hashes of their full blocks of :data:`BLOCK`
tokens, vLLM's scheme, and the match is then extended token by token. An entry that is a prefix of a
newer one is dropped (the newer one holds it), and the least recently used go first once the cache
holds more than its byte budget.

Runs on the engine's scheduler thread only. Not done (yet): sharing storage between entries that
share a prefix (a radix tree's nodes or vLLM's blocks); each entry holds its whole sequence.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

#: Tokens per hashed block (vLLM's default block size). Prompts shorter than one block are not cached.
BLOCK = 16


@dataclass(frozen=True)
class PrefixHit:
    """The first ``length`` tokens of a prompt, already computed: per-layer keys and values
    ``[kv_heads, length, head_dim]`` (views of the cache's tensors: never write into them), and when
    they are the whole prompt, the next token's ``logits`` ``[vocab]`` its first prefill gave."""

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor | None = None


@dataclass(eq=False)
class _Entry:
    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    blocks: list[int]  # chained hashes of its full blocks
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # prefix length -> next-token logits

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (*self.keys, *self.values, *self.logits.values()))


class PrefixCache:
    """Least-recently-used KV of past token sequences, within ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0  # read from the metrics scrape thread: one attribute load
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id(entry) -> entry, oldest first
        self._by_block: dict[int, dict[int, _Entry]] = {}  # chained block hash -> entries holding it

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int]) -> PrefixHit | None:
        """The longest cached prefix of ``ids``; None when less than one block matches.

        All of ``ids`` when a prefill of exactly these tokens left its next-token logits: the request
        then runs no forward pass at all, and a repeated prompt gets the first token (and, the decode
        steps being batch-invariant, the text) it got the first time. Otherwise at most all but the
        last token, whose forward pass gives the logits."""
        entry, length = self._longest(ids)
        if entry is None:
            return None
        logits = entry.logits.get(len(ids)) if length == len(ids) else None
        if logits is None:
            length = min(length, len(ids) - 1)
        self._entries.move_to_end(id(entry))
        return PrefixHit(
            length, [k[:, :length] for k in entry.keys], [v[:, :length] for v in entry.values], logits
        )

    def insert(
        self,
        ids: list[int],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        logits: torch.Tensor | None = None,
    ) -> None:
        """Remember ``ids`` with its per-layer ``keys`` and ``values`` ``[kv_heads, len(ids), head_dim]``
        and, from a prefill, the next token's ``logits`` ``[vocab]`` (all copied). Sequences shorter
        than a block, or larger than the whole budget, are not kept."""
        if len(ids) < BLOCK or sum(_nbytes(t) for t in (*keys, *values)) > self.capacity_bytes:
            return
        entry = _Entry(list(ids), [], [], list(_chain(ids)))
        for held in self._candidates(ids):
            if _is_prefix(ids, held.ids):  # already held, as this or a longer sequence
                self._entries.move_to_end(id(held))
                if logits is not None and len(ids) not in held.logits:
                    held.logits[len(ids)] = logits.clone()
                    self.nbytes += _nbytes(logits)
                    self._evict()
                return
            if _is_prefix(held.ids, ids):  # the new entry holds it, and the logits it kept
                entry.logits.update(held.logits)
                self._remove(held)
        entry.keys, entry.values = [k.clone() for k in keys], [v.clone() for v in values]
        if logits is not None:
            entry.logits[len(ids)] = logits.clone()
        self._entries[id(entry)] = entry
        for block in entry.blocks:
            self._by_block.setdefault(block, {})[id(entry)] = entry
        self.nbytes += entry.nbytes
        self._evict()

    def _longest(self, ids: list[int]) -> tuple[_Entry | None, int]:
        """The entry sharing the longest prefix with ``ids``, and that prefix's length."""
        matched: dict[int, _Entry] = {}
        blocks = 0
        for blocks_seen, block in enumerate(_chain(ids), start=1):
            found = self._by_block.get(block)
            if not found:
                break
            matched, blocks = found, blocks_seen
        head = ids[: blocks * BLOCK]
        best, best_length = None, 0
        for entry in matched.values():
            if entry.ids[: len(head)] != head:  # a hash collision
                continue
            length = len(head)
            limit = min(len(entry.ids), len(ids))
            while length < limit and entry.ids[length] == ids[length]:
                length += 1
            if length > best_length:
                best, best_length = entry, length
        return best, best_length

    def _candidates(self, ids: list[int]) -> list[_Entry]:
        """Entries sharing at least the first block with ``ids`` (each once)."""
        seen: dict[int, _Entry] = {}
        for block in _chain(ids):
            found = self._by_block.get(block)
            if not found:
                break
            seen.update(found)
        return list(seen.values())

    def _evict(self) -> None:
        while self.nbytes > self.capacity_bytes:
            self._remove(next(iter(self._entries.values())))

    def _remove(self, entry: _Entry) -> None:
        del self._entries[id(entry)]
        for block in entry.blocks:
            holders = self._by_block[block]
            del holders[id(entry)]
            if not holders:
                del self._by_block[block]
        self.nbytes -= entry.nbytes


def _chain(ids: list[int]) -> Iterator[int]:
    """Hashes of ``ids``' full blocks, each covering every token before it (vLLM's chained block hash)."""
    parent = 0
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        parent = hash((parent, *ids[start : start + BLOCK]))
        yield parent


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _is_prefix(short: list[int], long: list[int]) -> bool:
    return len(short) <= len(long) and long[: len(short)] == short
