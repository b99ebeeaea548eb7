"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes): the serving model's tokenizer and
chat template, for clients that count or build prompts in tokens."""

from __future__ import annotations

from aiohttp import web

from service.api import paths
from service.api.errors import ApiError, parse_body
from service.api.generation import chat_prompt, in_tokenizer_pool, serving_handle
from service.api.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

routes = web.RouteTableDef()


@routes.post(paths.TOKENIZE)
async def tokenize(request: web.Request) -> web.Response:
    body = await parse_body(request, TokenizeRequest)
    handle = serving_handle(request, body.model)
    if body.messages is not None:
        tokens = await chat_prompt(request, handle, body.messages)
    else:
        assert body.prompt is not None
        tokens = await in_tokenizer_pool(request, handle.encode_text, body.prompt, body.add_special_tokens)
    strings = (
        await in_tokenizer_pool(request, handle.token_strings, tokens) if body.return_token_strs else None
    )
    response = TokenizeResponse(
        count=len(tokens), max_model_len=handle.info.context_length, tokens=tokens, token_strs=strings
    )
    return web.json_response(response.model_dump())


@routes.post(paths.DETOKENIZE)
async def detokenize(request: web.Request) -> web.Response:
    body = await parse_body(request, DetokenizeRequest)
    handle = serving_handle(request, body.model)
    try:
        text = await in_tokenizer_pool(request, handle.decode, body.tokens)
    except ValueError as exc:
        raise ApiError(422, str(exc), type="invalid_request") from exc
    return web.json_response(DetokenizeResponse(prompt=text).model_dump())
