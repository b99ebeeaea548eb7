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


class ToolsUnsupportedError(ValueError):
    """The model's chat template does not render tools (the prompt is the same with or without them)."""


@dataclass(frozen=True)
class FastPath:
    """Which kernel serves the model's linear layers: None is PyTorch's, as loaded; ``layers`` counts
    the layers it serves by block format, ``reason`` says why it serves none or only some of them, or
    why its decoder layers do not run fused (see ``lifecycle.fast_path``)."""

    kernel: str | None
    layers: dict[str, int] = field(default_factory=dict)
    reason: str | None = None
    fused_layers: int = 0  # decoder layers that decode as one kernel call each (``kernels.llama_decode``)


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
    fast_path: FastPath = FastPath(None, reason="not tried yet")


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
    # A decode step faster than ``model``'s forward (``kernels.llama_decode.FusedDecoder``), or None.
    decode_step: Any = None
    _per_thread: threading.local = field(default_factory=threading.local, init=False, repr=False)

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of ``messages`` (``role``, ``content``, optional ``name``, ``tool_calls``,
        ``tool_call_id``) and of the ``tools`` the model may call (OpenAI's ``{"type": "function",
        "function": {...}}``), rendered with the model's chat template, ready for generation. Safe
        from any thread; CPU-bound (~0.8 s for 1 MiB of text).

        Raises :class:`ChatTemplateError` when the template refuses the messages,
        :class:`ToolsUnsupportedError` when it ignores ``tools``; any other exception is a fault of
        the server or the model, not of the request.
        """
        tokenizer = self._thread_tokenizer()
        try:
            if tools and _render(tokenizer, messages, tools) == _render(tokenizer, messages, None):
                raise ToolsUnsupportedError("the model's chat template does not render tools")
            ids = tokenizer.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=True, tokenize=True
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc)) from exc
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a raw ``text`` prompt (no chat template; with the tokenizer's BOS etc. when
        ``add_special_tokens``). Safe from any thread."""
        return list(self._thread_tokenizer()(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``, special tokens included. Safe from any thread; raises ValueError
        for an id outside the vocabulary."""
        if bad := [t for t in token_ids if not 0 <= t < self.vocab_size]:
            raise ValueError(f"token ids outside the vocabulary (0..{self.vocab_size - 1}): {bad[:5]}")
        return self._thread_tokenizer().decode(token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each of ``token_ids`` decoded on its own (how logprobs name tokens). Safe from any thread."""
        tokenizer = self._thread_tokenizer()
        return [tokenizer.decode([t]) for t in token_ids]

    @property
    def vocab_size(self) -> int:
        """Rows of the model's output layer: every token id below it can be scored."""
        return int(self.model.config.vocab_size)

    def _thread_tokenizer(self) -> Any:
        # Fast tokenizers shared between threads fail with "Already borrowed", so each thread gets
        # its own copy, made on first use (SmolLM2's: 0.12-0.3 s, ~8.8 MiB) and freed with the
        # handle. Copies rather than one copy behind a lock (benchmarks/tokenize_stall.py, 8 prompts
        # of 128 KiB on 2 threads): with free cores the copies tokenize in parallel (tokenizers
        # release the GIL), 0.27-0.30 s vs 0.50-0.62 s locked; on cores saturated by other work the
        # lock is as fast or faster (2.0-2.6 s vs 2.6-3.0 s). The lock would also queue every short
        # prompt behind a 1 MiB one (~0.85 s). The threads are few: the HTTP layer's tokenizer pool.
        # A deep copy only reads the original, as the scheduler thread's decode does.
        tokenizer = getattr(self._per_thread, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._per_thread.tokenizer = copy.deepcopy(self.tokenizer)
        return tokenizer


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
