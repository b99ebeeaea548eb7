"""Tool calls parsed out of the generated text, whole or as it streams.

The parsing is transformers' response parser (``transformers.utils.chat_parsing``), driven by the
model's own ``response_template`` when its tokenizer has one, else by the Hermes format that the
Qwen, SmolLM and Hermes chat templates use: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
any number of them, text around them being the message's content. A region that is not a call
(invalid JSON, no ``name``) stays content, as vLLM's Hermes parser leaves it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.chat_parsing.response_parser import ResponseParser

from service.engine.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

#: The Hermes format as a transformers response template (the output only: the prompt is not fed).
HERMES_RESPONSE_TEMPLATE: dict[str, Any] = {
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "content": {},
        "tool_calls": {
            "open": TOOL_CALL_OPEN,
            "close": TOOL_CALL_CLOSE,
            "content": "json",
            # A region that is not JSON closes with its text (kept as content) instead of raising.
            "content_args": {"allow_non_json": True},
            "repeats": True,
        },
    },
}


@dataclass(frozen=True)
class ToolCall:
    """One parsed call, in OpenAI's shape (``arguments`` is JSON text)."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ToolCallParser:
    """Feed it the generated text piece by piece; each call returns the content released and the
    calls completed by that piece (at most ``max_calls`` in all: later ones are dropped, as
    ``parallel_tool_calls: false`` asks). ``tokenizer`` supplies a ``response_template`` if it has one."""

    tokenizer: Any
    max_calls: int | None = None
    calls: list[ToolCall] = field(default_factory=list)
    _parser: ResponseParser = field(init=False)
    _region: list[str] | None = field(init=False, default=None)  # raw text of an open tool-call region

    def __post_init__(self) -> None:
        template = getattr(self.tokenizer, "response_template", None) or HERMES_RESPONSE_TEMPLATE
        self._parser = ResponseParser(template, prefix="")

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        return self._events(self._parser.feed(text), closed=True)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What the end of the text releases (a region left open is content, as written)."""
        return self._events(self._parser.finalize()[1], closed=False)

    def _events(self, events: list[dict[str, Any]], closed: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        new: list[ToolCall] = []
        for event in events:
            if event["field"] != "tool_calls":
                content.append(event.get("text", "") if event["type"] == "region_chunk" else "")
            elif event["type"] == "region_open":
                self._region = []
            elif event["type"] == "region_chunk" and self._region is not None:
                self._region.append(event["text"])
            elif event["type"] == "region_close":
                call = _tool_call(event["value"]) if closed else None
                if call is None:
                    content.append(
                        TOOL_CALL_OPEN + "".join(self._region or []) + (TOOL_CALL_CLOSE if closed else "")
                    )
                elif self.max_calls is None or len(self.calls) + len(new) < self.max_calls:
                    new.append(call)
                self._region = None
        self.calls += new
        return "".join(content), new


def _tool_call(value: Any) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        name=value["name"],
        arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
    )
