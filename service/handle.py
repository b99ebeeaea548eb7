"""The loaded model as the rest of the server sees it.

The model lifecycle builds a :class:`ModelHandle` and swaps it in; the engine generates with
whichever handle a request was admitted on. Neither imports the other: both depend on this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


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
    """A loaded model and its tokenizer; immutable once published by the lifecycle."""

    info: ModelInfo
    model: Any  # transformers PreTrainedModel (typed loosely to keep torch out of importers)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template, ready for generation."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
