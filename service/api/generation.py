"""What the generation endpoints share: turning a request into prompt token ids and sampling
parameters, queueing its choices on the engine, collecting results, and writing Server-Sent Events."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from opentelemetry import trace

from service import tracing
from service.api import keys
from service.api.errors import ApiError, engine_dead, model_not_ready, shutting_down
from service.api.protocol import (
    ChatMessage,
    ChoiceLogprobs,
    PromptTokensDetails,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from service.engine import GenerationStream
from service.engine.grammar import GrammarError
from service.engine.types import (
    EngineDeadError,
    EngineStoppedError,
    FinishReason,
    GenerationResult,
    Logprob,
    QueueFullError,
    SamplingParams,
    TokenDelta,
    TokenLogprobs,
)
from service.handle import ChatTemplateError, ModelHandle, ToolsUnsupportedError

T = TypeVar("T")

#: Headers of every Server-Sent Events response (no proxy buffering, no caching).
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Constraint:
    """Constrained decoding a request asks for: an llguidance grammar, and the request option it
    comes from (named in the 400 when the grammar uses what is not supported)."""

    option: str
    source: str


@dataclass
class Admitted:
    """A request queued on the engine: one stream per choice (``n`` per prompt, prompt by prompt)."""

    handle: ModelHandle
    streams: list[GenerationStream]
    request_id: str
    tracer: trace.Tracer

    @property
    def model_id(self) -> str:
        return self.handle.info.model_id

    def trace(self, result: GenerationResult) -> None:
        """Add the finished generation to the request's span (its phases, token counts)."""
        tracing.record_generation(self.tracer, result, self.model_id)


def serving_handle(request: web.Request, model: str | None = None) -> ModelHandle:
    """The serving model; 503 when none is, 404 when ``model`` names another one."""
    handle = request.app[keys.MANAGER].active
    if handle is None:
        request.app[keys.METRICS].requests_rejected.labels("no_model").inc()
        raise model_not_ready()
    if model and model != handle.info.model_id:
        raise ApiError(
            404, f"model {model!r} is not served here; GET /v1/models lists it", type="model_not_found"
        )
    return handle


async def in_tokenizer_pool(request: web.Request, work: Callable[..., T], *args: Any) -> T:
    """Run tokenizer ``work`` in the tokenizer pool: rendering and tokenizing take up to ~1 s for a
    1 MiB body, and running streams must keep flowing meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(request.app[keys.TOKENIZER_POOL], work, *args)


async def chat_prompt(
    request: web.Request,
    handle: ModelHandle,
    messages: Sequence[ChatMessage],
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The token ids of ``messages`` (and ``tools``) rendered with the model's chat template; 4xx when
    they cannot be (400 naming ``tools`` when the template ignores them)."""
    settings = request.app[keys.SETTINGS]
    if len(messages) > settings.max_messages:
        raise ApiError(422, f"at most {settings.max_messages} messages per request", type="invalid_request")
    for i, message in enumerate(messages):
        if kinds := message.non_text_part_types():
            raise ApiError(
                400,
                f"messages[{i}].content: parts of type {', '.join(map(repr, kinds))} are not supported "
                "(only text parts)",
                type="unsupported_content",
            )
    # Any error other than the template's refusal is the server's: a 500.
    try:
        return await in_tokenizer_pool(
            request, handle.encode_chat, [m.template_message() for m in messages], tools
        )
    except ChatTemplateError as exc:
        raise ApiError(
            422, f"the model's chat template rejected the messages: {exc}", type="invalid_request"
        ) from exc
    except ToolsUnsupportedError as exc:
        raise unsupported_option("tools", str(exc)) from exc


def unsupported_option(option: str, why: str) -> ApiError:
    """The 400 for an ``option`` this server does not serve in the way asked, saying ``why``."""
    return ApiError(
        400,
        f"not supported by this server: {option}: {why}",
        type="unsupported_option",
        details=[{"loc": [option], "msg": why, "type": "unsupported_option"}],
    )


def check_prompt(request: web.Request, handle: ModelHandle, prompt_ids: list[int]) -> None:
    """413 for a prompt over the limits, 422 for an empty one or one with ids outside the vocabulary."""
    if not prompt_ids:
        raise ApiError(422, "the prompt is empty", type="invalid_request")
    limit = request.app[keys.SETTINGS].max_prompt_tokens
    if handle.info.context_length:
        limit = min(limit, handle.info.context_length - 1)
    if len(prompt_ids) > limit:
        raise ApiError(
            413, f"the prompt is {len(prompt_ids)} tokens, over the limit of {limit}", type="prompt_too_long"
        )
    if max(prompt_ids) >= handle.vocab_size:
        raise ApiError(
            422,
            f"prompt token ids must be below the vocabulary size {handle.vocab_size}",
            type="invalid_request",
        )


def sampling_params(
    request: web.Request,
    handle: ModelHandle,
    sampling: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's parameters for ``sampling``; 422 for a max_tokens over the limit or a logit_bias
    token outside the vocabulary."""
    settings = request.app[keys.SETTINGS]
    max_tokens = max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(422, f"max_tokens must be at most {settings.max_tokens_limit}", type="invalid_request")
    bias = tuple((int(token), value) for token, value in (sampling.logit_bias or {}).items())
    if any(token >= handle.vocab_size for token, _ in bias):
        raise ApiError(
            422,
            f"logit_bias token ids must be below the vocabulary size {handle.vocab_size}",
            type="invalid_request",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if sampling.greedy else sampling.temperature,
        top_p=1.0 if sampling.greedy else sampling.top_p,
        stop=sampling.stop_tuple(),
        seed=sampling.sampling_seed,
        logit_bias=bias,
        repetition_penalty=sampling.repetition_penalty,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def check_n(request: web.Request, n: int, prompts: int = 1) -> None:
    """422 unless ``n`` choices (of each of ``prompts`` prompts) fit the server's limits: at most
    ``max_n`` and a batch's slots per prompt, and no more sequences than the server ever holds (a
    request that could never be admitted whole is not a 429)."""
    settings = request.app[keys.SETTINGS]
    limit = min(settings.max_n, settings.max_running_requests)
    if n > limit:
        raise ApiError(422, f"n must be at most {limit}", type="invalid_request")
    capacity = settings.max_running_requests + settings.max_queued_requests
    if n * prompts > capacity:
        raise ApiError(
            422,
            f"{prompts} prompts x n={n} is over the {capacity} sequences this server holds",
            type="invalid_request",
        )


def submit(
    request: web.Request, handle: ModelHandle, prompts: list[list[int]], params: SamplingParams, n: int
) -> Admitted:
    """Queue ``n`` choices of each prompt; 429/503 when the engine cannot take them all (then none)."""
    engine = request.app[keys.ENGINE]
    request_id = request["request_id"]
    streams: list[GenerationStream] = []
    try:
        for prompt_ids in prompts:
            streams += engine.submit_choices(handle, prompt_ids, params, n, request_id)
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
    finally:
        if len(streams) < n * len(prompts):  # a later prompt was refused: the earlier ones must not run
            for stream in streams:
                stream.cancel()
    return Admitted(handle, streams, request_id, request.app[keys.TRACER])


async def admit_chat(
    request: web.Request,
    handle: ModelHandle,
    messages: Sequence[ChatMessage],
    sampling: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None = None,
    n: int = 1,
    tools: list[dict[str, Any]] | None = None,
    constraint: Constraint | None = None,
) -> Admitted:
    """Render ``messages`` (and ``tools``) on the serving model, compile ``constraint``, and queue
    ``n`` choices of it (each choice with its own grammar matcher)."""
    check_n(request, n)
    params = sampling_params(request, handle, sampling, max_tokens, logprobs)
    prompt_ids = await chat_prompt(request, handle, messages, tools)
    check_prompt(request, handle, prompt_ids)
    if constraint is not None:  # a new grammar takes milliseconds to validate: off the loop
        try:
            grammar = await in_tokenizer_pool(
                request, request.app[keys.ENGINE].grammars.compile, handle, constraint.source
            )
        except GrammarError as exc:
            raise unsupported_option(constraint.option, str(exc)) from exc
        params = dataclasses.replace(params, grammar=grammar)
    return submit(request, handle, [prompt_ids], params, n)


def usage_of(results: list[GenerationResult], n: int = 1) -> Usage:
    """Usage of a request's results, ``n`` choices per prompt: each prompt counted once."""
    prompt = sum(r.usage.prompt_tokens for r in results[::n])
    completion = sum(r.usage.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=sum(r.usage.cached_tokens for r in results[::n])
        ),
    )


def top_logprob(p: Logprob) -> TopLogprob:
    return TopLogprob(token=p.token, logprob=p.logprob, bytes=list(p.bytes))


def chat_logprobs(scored: Sequence[TokenLogprobs]) -> ChoiceLogprobs:
    """OpenAI's chat ``logprobs`` object for these tokens."""
    return ChoiceLogprobs(
        content=[
            TokenLogprob(**top_logprob(s.chosen).model_dump(), top_logprobs=[top_logprob(p) for p in s.top])
            for s in scored
        ]
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


async def collect(admitted: Admitted) -> list[GenerationResult]:
    """Every choice's result (a client that goes away cancels the streams, freeing their slots at the
    next step); 500 if one failed."""
    results = await asyncio.gather(*(stream.collect() for stream in admitted.streams))
    admitted.trace(results[0])  # the request's span: the first choice's phases
    if failed := [r for r in results if r.finish_reason is FinishReason.ERROR]:
        raise ApiError(500, f"generation failed: {failed[0].error}", type="generation_error")
    return results


async def merged(admitted: Admitted) -> AsyncIterator[tuple[int, TokenDelta | GenerationResult]]:
    """The deltas of every choice as they come, tagged with the choice's index; each choice ends with
    its result. Leaving early cancels every choice still running."""
    queue: asyncio.Queue[tuple[int, TokenDelta | GenerationResult]] = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        async for delta in stream:
            queue.put_nowait((index, delta))
        assert stream.result is not None
        queue.put_nowait((index, stream.result))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(admitted.streams)]
    try:
        for _ in range(len(tasks)):
            while not isinstance((item := await queue.get())[1], GenerationResult):
                yield item
            yield item
    finally:
        for task in tasks:
            task.cancel()  # a stream cancelled while iterated cancels its request


async def sse_stream(
    request: web.Request, admitted: Admitted, events: AsyncIterator[Any]
) -> web.StreamResponse:
    """Send each event as ``data: <json>`` (a pydantic model, a dict or a literal string); a
    disconnect mid-stream cancels every choice."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        async for event in events:
            if isinstance(event, str):
                data = event
            elif isinstance(event, dict):
                data = json.dumps(event, separators=(",", ":"))
            else:
                data = event.model_dump_json()
            await response.write(f"data: {data}\n\n".encode())
        if (result := admitted.streams[0].result) is not None:
            admitted.trace(result)
    finally:  # a disconnect (cancelled handler, reset write) must not leave the generation running
        for stream in admitted.streams:
            stream.cancel()
    await response.write_eof()
    return response
