"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``, so the official SDKs work unchanged."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from service.api import keys, paths
from service.api.errors import ApiError, parse_body
from service.api.generation import Admitted, Constraint, admit, collect, sse_stream, timings_of, usage_of
from service.api.protocol import (
    NamedToolChoice,
    OpenAIAssistantMessage,
    OpenAIChatRequest,
    OpenAIChatResponse,
    OpenAIChoice,
    OpenAIModel,
    OpenAIModelList,
    ToolCallItem,
)
from service.api.tool_calls import ToolCall, ToolCallParser
from service.engine.grammar import NO_PARAMETERS, json_schema_grammar, tool_call_grammar
from service.engine.types import FinishReason

routes = web.RouteTableDef()


def _finish_reason(reason: FinishReason, called: bool = False) -> str:
    # OpenAI knows only stop/length/tool_calls here; a timeout is a cut-off like max_tokens.
    if reason in (FinishReason.LENGTH, FinishReason.TIMEOUT):
        return "length"
    return "tool_calls" if called else "stop"


def _constraint(body: OpenAIChatRequest) -> Constraint | None:
    """The grammar ``response_format`` or a forcing ``tool_choice`` asks for (None: free text)."""
    if body.calls_tools and body.tool_choice not in (None, "auto"):
        forced = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
        functions = [
            (t.function.name, t.function.parameters or NO_PARAMETERS)
            for t in body.tools or []
            if t.function is not None and forced in (None, t.function.name)
        ]
        return Constraint("tools", tool_call_grammar(functions))
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
    return Constraint("response_format", json_schema_grammar(schema))


def _tools(body: OpenAIChatRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template reads them (none when tool_choice is "none", as vLLM does)."""
    return [t.model_dump(exclude_none=True) for t in body.tools or []] if body.calls_tools else None


@routes.post(paths.OPENAI_CHAT_COMPLETIONS)
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, OpenAIChatRequest)
    active = request.app[keys.MANAGER].active
    if body.model and active is not None and body.model != active.info.model_id:
        raise ApiError(
            404, f"model {body.model!r} is not served here; GET /v1/models lists it", type="model_not_found"
        )
    if refused := body.unhonoured_options():
        raise ApiError(
            400,
            f"not supported by this server: {', '.join(refused)} (leave out, or set to the default)",
            type="unsupported_option",
            details=[
                {"loc": [name], "msg": "not supported", "type": "unsupported_option"} for name in refused
            ],
        )
    admitted = await admit(
        request,
        body.messages,
        body,
        body.max_completion_tokens or body.max_tokens,
        tools=_tools(body),
        constraint=_constraint(body),
    )
    # Tool calls are parsed out of the text when the model was offered tools.
    parser = ToolCallParser(admitted.handle.tokenizer) if body.calls_tools else None
    max_calls = 1 if body.parallel_tool_calls is False else None
    chat_id = f"chatcmpl-{admitted.stream.request_id}"
    created = int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return await sse_stream(
            request,
            admitted,
            _chunks(request, admitted, chat_id, created, include_usage, parser, max_calls),
        )
    result = await collect(admitted)
    content, calls = result.text, []
    if parser is not None:
        content, calls = _parsed(parser, result.text, max_calls)
    response = OpenAIChatResponse(
        id=chat_id,
        created=created,
        model=admitted.model_id,
        choices=[
            OpenAIChoice(
                index=0,
                message=OpenAIAssistantMessage(
                    content=content if content or not calls else None,
                    tool_calls=[ToolCallItem.model_validate(c.openai()) for c in calls] or None,
                ),
                finish_reason=_finish_reason(result.finish_reason, bool(calls)),
            )
        ],
        usage=usage_of(result),
    ).model_dump()
    if timings := timings_of(request, result):
        response["timings"] = timings
    return web.json_response(response)


def _parsed(parser: ToolCallParser, text: str, max_calls: int | None) -> tuple[str, list[ToolCall]]:
    """The content and the tool calls (at most ``max_calls``) of a whole ``text``."""
    content, calls = parser.feed(text)
    tail, last = parser.finish()
    return content + tail, (calls + last)[:max_calls]


async def _chunks(
    request: web.Request,
    admitted: Admitted,
    chat_id: str,
    created: int,
    include_usage: bool,
    parser: ToolCallParser | None,
    max_calls: int | None,
) -> AsyncIterator[Any]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": admitted.model_id,
            "choices": choices,
            **extra,
        }

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "finish_reason": finish_reason}]

    sent_calls = 0

    def deltas(content: str, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """Chunks for released ``content`` and completed ``calls`` (each call whole, in one delta)."""
        nonlocal sent_calls
        out = [chunk(choice({"content": content}))] if content else []
        for call in calls[: None if max_calls is None else max(0, max_calls - sent_calls)]:
            out.append(chunk(choice({"tool_calls": [{"index": sent_calls, **call.openai()}]})))
            sent_calls += 1
        return out

    yield chunk(choice({"role": "assistant", "content": ""}))
    stream = admitted.stream
    async for delta in stream:
        if delta.text:
            for event in deltas(*parser.feed(delta.text)) if parser else deltas(delta.text, []):
                yield event
    result = stream.result
    assert result is not None
    if parser is not None:
        for event in deltas(*parser.finish()):
            yield event
    if result.finish_reason is FinishReason.ERROR:
        last = [{"error": {"type": "generation_error", "message": result.error}}]
    else:
        last = [chunk(choice({}, _finish_reason(result.finish_reason, sent_calls > 0)))]
    if include_usage:
        last.append(chunk([], usage=usage_of(result).model_dump()))
    if timings := timings_of(request, result):
        last[-1]["timings"] = timings
    for event in last:
        yield event
    yield "[DONE]"


@routes.get(paths.OPENAI_MODELS)
async def list_models(request: web.Request) -> web.Response:
    active = request.app[keys.MANAGER].active
    data = (
        []
        if active is None
        else [OpenAIModel(id=active.info.model_id, created=int(active.info.loaded_at.timestamp()))]
    )
    return web.json_response(OpenAIModelList(data=data).model_dump())
