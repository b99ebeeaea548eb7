"""The loaded model as the rest of the server sees it.

The model lifecycle builds a :class:`ModelHandle` and swaps it in; the engine generates with
whichever handle a request was admitted on. Neither imports the other: both depend on this.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2


class ChatTemplateError(ValueError):
    """The model's chat template refused the messages (its ``raise_exception``, a role order it rejects)."""


@dataclass(frozen=True)
class ModelInfo:
    """What ``GET /model`` reports about a loaded model."""

    model_id: str
    revision: str | None
    source: str  # "hub", "local" or "bundled"
    dtype: str
    device: str
    parameters: int
    loaded_at: datetime
    path: str = ""
    context_length: int | None = None


@dataclass(eq=False)
class ModelHandle:
    """A loaded model and its tokenizer; immutable once published by the lifecycle.

    ``tokenizer`` itself belongs to the engine's scheduler thread (it decodes with it); any other
    thread renders prompts through :meth:`encode_chat`, which uses that thread's own copy.
    """

    info: ModelInfo
    model: Any  # transformers PreTrainedModel (typed loosely to keep torch out of importers)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    _per_thread: threading.local = field(default_factory=threading.local, init=False, repr=False)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` (``role``, ``content``, optional ``name``) rendered with the model's
        chat template, ready for generation. Safe from any thread; CPU-bound (~0.8 s for 1 MiB of text).

        Raises :class:`ChatTemplateError` when the template refuses the messages; any other exception
        is a fault of the server or the model, not of the request.
        """
        try:
            ids = self._thread_tokenizer().apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc)) from exc
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def _thread_tokenizer(self) -> Any:
        # Fast tokenizers shared between threads fail with "Already borrowed", so each thread gets
        # its own copy, made on first use (SmolLM2's: ~0.12 s, ~8 MiB) and freed with the handle.
        # Copies rather than one locked copy: the lock serializes prompt tokenizing (which runs
        # without the GIL), measured 8 prompts of 128 KiB on 2 threads in 0.50-0.62 s locked vs
        # 0.27-0.30 s with copies (benchmarks/tokenize_stall.py); the threads are few (the HTTP
        # layer's tokenizer pool). A deep copy only reads the original, which the scheduler
        # thread's decode does too.
        tokenizer = getattr(self._per_thread, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._per_thread.tokenizer = copy.deepcopy(self.tokenizer)
        return tokenizer
