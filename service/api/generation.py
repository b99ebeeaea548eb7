"""What /completion and /v1/chat/completions share: admitting a chat request to the engine,
collecting its result, and writing Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry import trace

from service import tracing
from service.api import keys
from service.api.errors import ApiError, engine_dead, model_not_ready, shutting_down
from service.api.protocol import ChatMessage, SamplingFields, Usage
from service.engine import GenerationStream
from service.engine.types import (
    EngineDeadError,
    EngineStoppedError,
    FinishReason,
    GenerationResult,
    QueueFullError,
    SamplingParams,
)
from service.handle import ChatTemplateError, ModelHandle

#: Headers of every Server-Sent Events response (no proxy buffering, no caching).
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Admitted:
    handle: ModelHandle
    stream: GenerationStream
    tracer: trace.Tracer

    @property
    def model_id(self) -> str:
        return self.handle.info.model_id

    def trace(self, result: GenerationResult) -> None:
        """Add the finished generation to the request's span (its phases, token counts)."""
        tracing.record_generation(self.tracer, result, self.model_id)


async def admit(
    request: web.Request,
    messages: Sequence[ChatMessage],
    sampling: SamplingFields,
    max_tokens: int | None,
) -> Admitted:
    """Render the prompt on the serving model and queue it; 4xx/429/503 when that cannot be done."""
    app = request.app
    settings = app[keys.SETTINGS]
    handle = app[keys.MANAGER].active
    if handle is None:
        app[keys.METRICS].requests_rejected.labels("no_model").inc()
        raise model_not_ready()
    if len(messages) > settings.max_messages:
        raise ApiError(422, f"at most {settings.max_messages} messages per request", type="invalid_request")
    max_tokens = max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(422, f"max_tokens must be at most {settings.max_tokens_limit}", type="invalid_request")
    for i, message in enumerate(messages):
        if kinds := message.non_text_part_types():
            raise ApiError(
                400,
                f"messages[{i}].content: parts of type {', '.join(map(repr, kinds))} are not supported "
                "(only text parts)",
                type="unsupported_content",
            )
    # Rendering and tokenizing take up to ~1 s for a 1 MiB body: off the event loop, so running
    # streams keep flowing. Any error other than the template's refusal is the server's: a 500.
    try:
        prompt_ids = await asyncio.get_running_loop().run_in_executor(
            app[keys.TOKENIZER_POOL], handle.encode_chat, [m.template_message() for m in messages]
        )
    except ChatTemplateError as exc:
        raise ApiError(
            422, f"the model's chat template rejected the messages: {exc}", type="invalid_request"
        ) from exc
    if not prompt_ids:
        raise ApiError(422, "the messages rendered to an empty prompt", type="invalid_request")
    limit = settings.max_prompt_tokens
    if handle.info.context_length:
        limit = min(limit, handle.info.context_length - 1)
    if len(prompt_ids) > limit:
        raise ApiError(
            413, f"the prompt is {len(prompt_ids)} tokens, over the limit of {limit}", type="prompt_too_long"
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if sampling.greedy else sampling.temperature,
        top_p=1.0 if sampling.greedy else sampling.top_p,
        stop=sampling.stop_tuple(),
        seed=sampling.sampling_seed,
    )
    try:
        stream = app[keys.ENGINE].submit(handle, prompt_ids, params)
    except QueueFullError as exc:
        raise ApiError(
            429,
            str(exc),
            type="overloaded",
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
        ) from exc
    except EngineStoppedError as exc:
        raise shutting_down() from exc
    except EngineDeadError as exc:
        raise engine_dead(exc.reason) from exc
    request["request_id"] = stream.request_id
    return Admitted(handle, stream, app[keys.TRACER])


def usage_of(result: GenerationResult) -> Usage:
    u = result.usage
    return Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens
    )


#: Request header that adds per-request ``timings`` to the response (or the last stream event).
TIMINGS_HEADER = "X-Timings"


def timings_of(request: web.Request, result: GenerationResult) -> dict[str, Any] | None:
    """llama.cpp-style ``timings`` of ``result`` (milliseconds, tokens, tokens/s) when the request
    sent ``X-Timings: true``; else None."""
    t = result.timings
    if t is None or request.headers.get(TIMINGS_HEADER, "").strip().lower() not in ("1", "true", "yes"):
        return None

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 3)

    return {
        "queue_ms": ms(t.queue_s),
        "prefill_ms": ms(t.prefill_s),
        "ttft_ms": ms(t.ttft_s),
        "decode_ms": ms(t.decode_s),
        "total_ms": ms(t.total_s),
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "decode_tokens_per_s": t.decode_tokens_per_s,
    }


async def collect(admitted: Admitted) -> GenerationResult:
    """The whole result (a client that goes away cancels the stream, freeing its slot at the next step)."""
    result = await admitted.stream.collect()
    admitted.trace(result)
    if result.finish_reason is FinishReason.ERROR:
        raise ApiError(500, f"generation failed: {result.error}", type="generation_error")
    return result


async def sse_stream(
    request: web.Request, admitted: Admitted, events: AsyncIterator[dict | str]
) -> web.StreamResponse:
    """Send each event as ``data: <json>``; a disconnect mid-stream cancels the generation."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.headers["X-Request-Id"] = admitted.stream.request_id
    await response.prepare(request)
    try:
        async for event in events:
            data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
            await response.write(f"data: {data}\n\n".encode())
        if admitted.stream.result is not None:
            admitted.trace(admitted.stream.result)
    finally:  # a disconnect (cancelled handler, reset write) must not leave the generation running
        admitted.stream.cancel()
    await response.write_eof()
    return response
