"""Token ids to streamed text: incremental detokenization and stop strings.

Pure Python over a tokenizer's ``decode``; no torch, so it is cheap to test on its own.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

# Prompt tokens decoded in front of the completion so the first completion token gets the spacing it
# has in context (SentencePiece tokenizers drop a leading space when a token is decoded alone).
_CONTEXT_TOKENS = 4
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character.

    The offsets technique of text-generation-inference: decode a short window twice (with and
    without the newest tokens) and emit the difference, holding it back while it ends in an
    incomplete UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopStringMatcher:
    """Accumulates the completion text, cuts it at the first stop string, and holds back any tail
    that could still grow into one, so a client never sees part of a stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._max_len = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self._emitted = 0

    def push(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; return the text now safe to emit and whether a stop string was found."""
        if not self._stop:
            self.text += piece
            self._emitted = len(self.text)
            return piece, False
        # A stop string can only end inside the new piece, so search from max_len - 1 before it.
        search_from = max(0, len(self.text) - self._max_len + 1)
        self.text += piece
        hits = [i for s in self._stop if (i := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._pending_prefix_len()), False

    def flush(self) -> str:
        """The held-back tail, released when generation ends without completing a stop string."""
        return self._take(len(self.text))

    def _pending_prefix_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for k in range(min(self._max_len - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out


@cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's printable stand-in characters back to the bytes they stand for."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token_id: int, text: str) -> tuple[int, ...]:
    """The bytes of one token whose text (decoded on its own) is ``text``: for a byte-level BPE
    token its own bytes, even when it holds only part of a multi-byte character (``text`` is then
    U+FFFD); else the UTF-8 of ``text``."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    byte_of = _byte_of_char()
    if isinstance(piece, str) and piece and all(c in byte_of for c in piece):
        raw = bytes(byte_of[c] for c in piece)
        if raw.decode("utf-8", errors="replace") == text:  # the tokenizer is byte-level indeed
            return tuple(raw)
    return tuple(text.encode())
