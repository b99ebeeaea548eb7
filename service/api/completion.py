"""``POST /completion``: chat messages in, the assistant's reply out (JSON, or SSE with ``stream``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from service.api import paths
from service.api.errors import parse_body
from service.api.generation import (
    Admitted,
    admit_chat,
    chat_logprobs,
    collect,
    serving_handle,
    sse_stream,
    timings_of,
    usage_of,
)
from service.api.protocol import (
    AssistantMessage,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
)

routes = web.RouteTableDef()


@routes.post(paths.COMPLETION)
async def completion(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, CompletionRequest)
    handle = serving_handle(request)
    admitted = await admit_chat(request, handle, body.messages, body, body.max_tokens, body.logprobs_k)
    if body.stream:
        return await sse_stream(request, admitted, _chunks(request, admitted))
    [result] = await collect(admitted)
    response = CompletionResponse(
        id=admitted.request_id,
        model=admitted.model_id,
        message=AssistantMessage(content=result.text),
        finish_reason=result.finish_reason.value,
        usage=usage_of([result]),
        logprobs=None if result.logprobs is None else chat_logprobs(result.logprobs),
    ).model_dump(exclude_none=True)
    if timings := timings_of(request, result):
        response["timings"] = timings
    return web.json_response(response)


async def _chunks(request: web.Request, admitted: Admitted) -> AsyncIterator[dict[str, Any]]:
    [stream] = admitted.streams
    async for delta in stream:
        if delta.text or delta.logprobs:
            yield CompletionChunk(
                id=admitted.request_id,
                model=admitted.model_id,
                delta=delta.text,
                logprobs=chat_logprobs(delta.logprobs) if delta.logprobs else None,
            ).model_dump(exclude_none=True)
    result = stream.result
    assert result is not None
    last = CompletionChunk(
        id=admitted.request_id,
        model=admitted.model_id,
        delta="",
        finish_reason=result.finish_reason.value,
        usage=usage_of([result]),
        error=ErrorDetail(type="generation_error", message=result.error) if result.error else None,
    ).model_dump(exclude_none=True)
    if timings := timings_of(request, result):
        last["timings"] = timings
    yield last
