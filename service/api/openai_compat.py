"""OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` (legacy) and ``/v1/models``, so
the official SDKs work unchanged."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from service.api import keys, paths
from service.api.errors import ApiError, parse_body
from service.api.generation import (
    Admitted,
    Constraint,
    admit_chat,
    chat_logprobs,
    check_n,
    check_prompt,
    collect,
    in_tokenizer_pool,
    merged,
    sampling_params,
    serving_handle,
    sse_stream,
    submit,
    timings_of,
    usage_of,
)
from service.api.protocol import (
    ChatChunkChoice,
    ChatDelta,
    ChoiceLogprobs,
    ErrorDetail,
    LegacyChoice,
    LegacyCompletionRequest,
    LegacyCompletionResponse,
    LegacyLogprobs,
    NamedToolChoice,
    OpenAIAssistantMessage,
    OpenAIChatChunk,
    OpenAIChatRequest,
    OpenAIChatResponse,
    OpenAIChoice,
    OpenAIModel,
    OpenAIModelList,
    OpenAIRequest,
    StreamError,
    ToolCallDelta,
    ToolCallItem,
)
from service.api.tool_calls import ToolCall, ToolCallParser
from service.engine.grammar import NO_PARAMETERS, json_schema_grammar, tool_call_grammar
from service.engine.types import FinishReason, GenerationResult, TokenLogprobs
from service.handle import ModelHandle

routes = web.RouteTableDef()


def _finish_reason(reason: FinishReason, called: bool = False) -> Any:
    # OpenAI knows only stop/length/tool_calls here; a timeout is a cut-off like max_tokens.
    if reason in (FinishReason.LENGTH, FinishReason.TIMEOUT):
        return "length"
    return "tool_calls" if called else "stop"


def _refuse_unhonoured(body: OpenAIRequest) -> None:
    if refused := body.unhonoured_options():
        raise ApiError(
            400,
            f"not supported by this server: {', '.join(refused)} (leave out, or set to the default)",
            type="unsupported_option",
            details=[
                {"loc": [name], "msg": "not supported", "type": "unsupported_option"} for name in refused
            ],
        )


def _stream_end(request: web.Request, results: list[GenerationResult], n: int, usage_event: Any) -> list[Any]:
    """The events after the choices' last deltas: an error event if a choice failed, else the usage
    event when asked; ``timings`` on the last one; then ``[DONE]``."""
    if failed := [r for r in results if r.finish_reason is FinishReason.ERROR]:
        last: list[Any] = [
            StreamError(error=ErrorDetail(type="generation_error", message=failed[0].error or ""))
        ]
    else:
        last = [usage_event.model_copy(update={"usage": usage_of(results, n)})] if usage_event else []
    if last and (timings := timings_of(request, results[0])):
        last[-1] = {**last[-1].model_dump(), "timings": timings}
    return [*last, "[DONE]"]


# ----------------------------------------------------------------------------- chat completions


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
    return Constraint("response_format", json_schema_grammar(fmt.json_schema and fmt.json_schema.json_schema))


def _tools(body: OpenAIChatRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template reads them (none when tool_choice is "none", as vLLM does)."""
    return [t.model_dump(exclude_none=True) for t in body.tools or []] if body.calls_tools else None


def _tool_parser(body: OpenAIChatRequest, handle: ModelHandle) -> ToolCallParser | None:
    """A parser of one choice's tool calls, when the model was offered tools."""
    return (
        ToolCallParser(handle.tokenizer, 1 if body.parallel_tool_calls is False else None)
        if body.calls_tools
        else None
    )


@routes.post(paths.OPENAI_CHAT_COMPLETIONS)
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, OpenAIChatRequest)
    handle = serving_handle(request, body.model)
    _refuse_unhonoured(body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    admitted = await admit_chat(
        request,
        handle,
        body.messages,
        body,
        max_tokens,
        body.logprobs_k,
        body.n,
        tools=_tools(body),
        constraint=_constraint(body),
    )
    chat_id = f"chatcmpl-{admitted.request_id}"
    created = int(time.time())
    if body.stream:
        return await sse_stream(request, admitted, _chat_chunks(request, admitted, body, chat_id, created))
    results = await collect(admitted)
    response = OpenAIChatResponse(
        id=chat_id,
        created=created,
        model=admitted.model_id,
        choices=[_chat_choice(i, result, _tool_parser(body, handle)) for i, result in enumerate(results)],
        usage=usage_of(results, body.n),
    ).model_dump()
    if timings := timings_of(request, results[0]):
        response["timings"] = timings
    return web.json_response(response)


def _chat_choice(index: int, result: GenerationResult, parser: ToolCallParser | None) -> OpenAIChoice:
    content, calls = result.text, []
    if parser is not None:  # the text's tool calls, and the content around them
        content, calls = parser.feed(result.text)
        tail, last = parser.finish()
        content, calls = content + tail, calls + last
    return OpenAIChoice(
        index=index,
        message=OpenAIAssistantMessage(
            content=content if content or not calls else None,
            tool_calls=[ToolCallItem.model_validate(c.openai()) for c in calls] or None,
        ),
        logprobs=None if result.logprobs is None else chat_logprobs(result.logprobs),
        finish_reason=_finish_reason(result.finish_reason, bool(calls)),
    )


async def _chat_chunks(
    request: web.Request, admitted: Admitted, body: OpenAIChatRequest, chat_id: str, created: int
) -> AsyncIterator[Any]:
    def chunk(choices: list[ChatChunkChoice]) -> OpenAIChatChunk:
        return OpenAIChatChunk(id=chat_id, created=created, model=admitted.model_id, choices=choices)

    def deltas(i: int, parsed: tuple[str, list[ToolCall]], logprobs: ChoiceLogprobs | None = None) -> Any:
        """Choice ``i``'s chunks for released content and completed tool calls (each call whole)."""
        content, calls = parsed
        if content or logprobs:
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=content), logprobs=logprobs)])
        for call in calls:
            delta = ChatDelta(tool_calls=[ToolCallDelta(index=sent[i], **call.openai())])
            sent[i] += 1
            yield chunk([ChatChunkChoice(index=i, delta=delta)])

    parsers = [_tool_parser(body, admitted.handle) for _ in admitted.streams]
    sent = [0] * len(admitted.streams)  # tool calls sent per choice
    for i in range(len(admitted.streams)):
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
    results: list[GenerationResult] = [None] * len(admitted.streams)  # type: ignore[list-item]
    async for i, item in merged(admitted):
        parser = parsers[i]
        if isinstance(item, GenerationResult):
            results[i] = item
            if parser is not None:
                for event in deltas(i, parser.finish()):
                    yield event
            if item.finish_reason is not FinishReason.ERROR:
                finish = _finish_reason(item.finish_reason, sent[i] > 0)
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=finish)])
        elif item.text or item.logprobs:
            logprobs = chat_logprobs(item.logprobs) if body.logprobs else None
            parsed = parser.feed(item.text) if parser is not None else (item.text, [])
            for event in deltas(i, parsed, logprobs):
                yield event
    for event in _stream_end(request, results, body.n, chunk([]) if body.include_usage else None):
        yield event


# ----------------------------------------------------------------------------- legacy completions


@dataclass
class _Prompt:
    ids: list[int]
    echo: str  # the text echoed in front of each choice ("" without echo)
    first_token: str  # the first token's text: the echoed logprobs name it, without a logprob


@routes.post(paths.OPENAI_COMPLETIONS)
async def completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, LegacyCompletionRequest)
    handle = serving_handle(request, body.model)
    _refuse_unhonoured(body)
    check_n(request, body.n, len(body.prompts()))
    k = body.logprobs
    scores_prompt = body.echo and k is not None
    params = sampling_params(request, handle, body, body.max_tokens, k, k if scores_prompt else None)
    prompts = [await in_tokenizer_pool(request, _prompt, handle, p, body.echo) for p in body.prompts()]
    for prompt in prompts:
        check_prompt(request, handle, prompt.ids)
    admitted = submit(request, handle, [p.ids for p in prompts], params, body.n)
    completion_id = f"cmpl-{admitted.request_id}"
    created = int(time.time())
    choice_prompts = [p for p in prompts for _ in range(body.n)]
    if body.stream:
        events = _legacy_chunks(request, admitted, body, choice_prompts, completion_id, created)
        return await sse_stream(request, admitted, events)
    results = await collect(admitted)
    choices = [
        LegacyChoice(
            text=prompt.echo + result.text,
            index=i,
            logprobs=None if k is None else _legacy_logprobs(prompt, result.prompt_logprobs, result.logprobs),
            finish_reason=_finish_reason(result.finish_reason),
        )
        for i, (prompt, result) in enumerate(zip(choice_prompts, results, strict=True))
    ]
    response = LegacyCompletionResponse(
        id=completion_id,
        created=created,
        model=admitted.model_id,
        choices=choices,
        usage=usage_of(results, body.n),
    ).model_dump()
    if timings := timings_of(request, results[0]):
        response["timings"] = timings
    return web.json_response(response)


def _prompt(handle: ModelHandle, prompt: str | list[int], echo: bool) -> _Prompt:
    """Tokenize (or, for token ids, decode) one prompt; in the tokenizer pool. 422 for ids outside
    the vocabulary."""
    try:
        ids = handle.encode_text(prompt) if isinstance(prompt, str) else prompt
        if not echo or not ids:
            return _Prompt(ids, "", "")
        text = prompt if isinstance(prompt, str) else handle.decode(prompt)
        return _Prompt(ids, text, handle.token_strings(ids[:1])[0])
    except ValueError as exc:
        raise ApiError(422, str(exc), type="invalid_request") from exc


def _legacy_logprobs(
    prompt: _Prompt,
    prompt_logprobs: Sequence[TokenLogprobs | None] | None,
    logprobs: Sequence[TokenLogprobs] | None,
    offset: int = 0,
) -> LegacyLogprobs:
    """OpenAI's legacy logprobs of the (echoed) prompt's tokens and the generated ones, the first at
    character ``offset`` of the choice's text. Token offsets add up token texts, as vLLM's do."""
    out = LegacyLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for entry in [*(prompt_logprobs or ()), *(logprobs or ())]:
        token = (
            prompt.first_token if entry is None and prompt else "" if entry is None else entry.chosen.token
        )
        out.tokens.append(token)
        out.token_logprobs.append(None if entry is None else entry.chosen.logprob)
        out.top_logprobs.append(None if entry is None else {p.token: p.logprob for p in entry.top})
        out.text_offset.append(offset)
        offset += len(token)
    return out


async def _legacy_chunks(
    request: web.Request,
    admitted: Admitted,
    body: LegacyCompletionRequest,
    prompts: list[_Prompt],
    completion_id: str,
    created: int,
) -> AsyncIterator[Any]:
    def chunk(choices: list[LegacyChoice]) -> LegacyCompletionResponse:
        return LegacyCompletionResponse(
            id=completion_id, created=created, model=admitted.model_id, choices=choices
        )

    offsets = [0] * len(admitted.streams)  # characters of each choice's text sent so far
    results: list[GenerationResult] = [None] * len(admitted.streams)  # type: ignore[list-item]
    async for i, item in merged(admitted):
        if isinstance(item, GenerationResult):
            results[i] = item
            if item.finish_reason is not FinishReason.ERROR:
                yield chunk(
                    [LegacyChoice(text="", index=i, finish_reason=_finish_reason(item.finish_reason))]
                )
            continue
        text, logprobs = item.text, None
        if offsets[i] == 0 and prompts[i].echo:  # the first delta: the prompt comes first
            text = prompts[i].echo + text
        if body.logprobs is not None:
            echoed = item.prompt_logprobs if prompts[i].echo else None
            logprobs = _legacy_logprobs(prompts[i], echoed, item.logprobs, offsets[i])
        if text or logprobs:
            offsets[i] += len(text)
            yield chunk([LegacyChoice(text=text, index=i, logprobs=logprobs, finish_reason=None)])
    for event in _stream_end(request, results, body.n, chunk([]) if body.include_usage else None):
        yield event


@routes.get(paths.OPENAI_MODELS)
async def list_models(request: web.Request) -> web.Response:
    active = request.app[keys.MANAGER].active
    data = (
        []
        if active is None
        else [OpenAIModel(id=active.info.model_id, created=int(active.info.loaded_at.timestamp()))]
    )
    return web.json_response(OpenAIModelList(data=data).model_dump())
