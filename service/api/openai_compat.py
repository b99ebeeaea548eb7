"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``, so the official SDKs work unchanged."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from service.api import keys, paths
from service.api.errors import ApiError, parse_body
from service.api.generation import Admitted, admit, collect, sse_stream, timings_of, usage_of
from service.api.protocol import (
    AssistantMessage,
    OpenAIChatRequest,
    OpenAIChatResponse,
    OpenAIChoice,
    OpenAIModel,
    OpenAIModelList,
)
from service.engine.types import FinishReason

routes = web.RouteTableDef()


def _finish_reason(reason: FinishReason) -> str:
    # OpenAI knows only stop/length here; a timeout is a cut-off like max_tokens.
    return "length" if reason in (FinishReason.LENGTH, FinishReason.TIMEOUT) else "stop"


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
    admitted = await admit(request, body.messages, body, body.max_completion_tokens or body.max_tokens)
    chat_id = f"chatcmpl-{admitted.stream.request_id}"
    created = int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return await sse_stream(
            request, admitted, _chunks(request, admitted, chat_id, created, include_usage)
        )
    result = await collect(admitted)
    response = OpenAIChatResponse(
        id=chat_id,
        created=created,
        model=admitted.model_id,
        choices=[
            OpenAIChoice(
                index=0,
                message=AssistantMessage(content=result.text),
                finish_reason=_finish_reason(result.finish_reason),
            )
        ],
        usage=usage_of(result),
    ).model_dump()
    if timings := timings_of(request, result):
        response["timings"] = timings
    return web.json_response(response)


async def _chunks(
    request: web.Request, admitted: Admitted, chat_id: str, created: int, include_usage: bool
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

    def choice(delta: dict[str, str], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "finish_reason": finish_reason}]

    yield chunk(choice({"role": "assistant", "content": ""}))
    stream = admitted.stream
    async for delta in stream:
        if delta.text:
            yield chunk(choice({"content": delta.text}))
    result = stream.result
    assert result is not None
    if result.finish_reason is FinishReason.ERROR:
        last = [{"error": {"type": "generation_error", "message": result.error}}]
    else:
        last = [chunk(choice({}, _finish_reason(result.finish_reason)))]
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
