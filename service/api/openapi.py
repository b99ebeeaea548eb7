"""``GET /openapi.json``: the OpenAPI 3.1 document, generated from the pydantic models in ``protocol``.

Each endpoint is listed once below with its request and response models; the schemas come from
pydantic, so the document cannot drift from what the handlers validate and return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api import paths, protocol

routes = web.RouteTableDef()

_REF = "#/components/schemas/{model}"
_TEXT = {"schema": {"type": "string"}}


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    summary: str
    ok: type[BaseModel] | None  # None: a plain-text answer (metrics)
    ok_status: int = 200
    request: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    # JSON payloads of the SSE events (also answers text/event-stream when the body asks for it)
    stream_events: tuple[type[BaseModel], ...] = ()
    stream_done: bool = False  # the stream ends with the literal event data [DONE]
    events: str = ""  # answers only text/event-stream, with events as described here
    extra_ok: dict[int, type[BaseModel]] = field(default_factory=dict)
    admin: bool = False


_BODY_ERRORS = (400, 413, 415, 422)
_GENERATION_ERRORS = (*_BODY_ERRORS, 429, 500, 503)


def _openai(
    path: str, summary: str, ok: type[BaseModel], request: type[BaseModel], chunk: type[BaseModel]
) -> Endpoint:
    """An OpenAI generation endpoint: its stream is ``chunk`` events, an error event, then ``[DONE]``."""
    return Endpoint(
        "post",
        path,
        summary,
        ok,
        request=request,
        errors=(*_GENERATION_ERRORS, 404),
        stream_events=(chunk, protocol.StreamError),
        stream_done=True,
    )


ENDPOINTS = (
    Endpoint(
        "post",
        paths.COMPLETION,
        "Chat completion (JSON, or SSE with stream=true)",
        protocol.CompletionResponse,
        request=protocol.CompletionRequest,
        errors=_GENERATION_ERRORS,
        stream_events=(protocol.CompletionChunk,),
    ),
    _openai(
        paths.OPENAI_CHAT_COMPLETIONS,
        "OpenAI-compatible chat completion",
        protocol.OpenAIChatResponse,
        protocol.OpenAIChatRequest,
        protocol.OpenAIChatChunk,
    ),
    _openai(
        paths.OPENAI_COMPLETIONS,
        "OpenAI-compatible (legacy) text completion",
        protocol.LegacyCompletionResponse,
        protocol.LegacyCompletionRequest,
        protocol.LegacyCompletionResponse,
    ),
    *(
        Endpoint("post", path, summary, ok, request=request, errors=(*_BODY_ERRORS, 404, 503))
        for path, summary, ok, request in (
            (
                paths.TOKENIZE,
                "Token ids of a prompt or of chat messages (vLLM's shape)",
                protocol.TokenizeResponse,
                protocol.TokenizeRequest,
            ),
            (
                paths.DETOKENIZE,
                "Text of token ids (vLLM's shape)",
                protocol.DetokenizeResponse,
                protocol.DetokenizeRequest,
            ),
        )
    ),
    Endpoint("get", paths.OPENAI_MODELS, "OpenAI-compatible model list", protocol.OpenAIModelList),
    Endpoint("get", paths.MODEL, "The serving model", protocol.ModelInfoResponse, errors=(503,)),
    Endpoint(
        "post",
        paths.MODEL,
        "Deploy another model (202: started; 200: already serving). Cluster mode: the fleet's "
        "desired model, answered with the fleet view (FleetView)",
        protocol.DeploymentResponse,
        ok_status=202,
        request=protocol.DeployRequest,
        errors=(*_BODY_ERRORS, 401, 403, 404, 409, 503),
        extra_ok={200: protocol.DeploymentResponse},
        admin=True,
    ),
    Endpoint("get", paths.STATUS, "Deployment status and history", protocol.StatusResponse),
    Endpoint("get", paths.STATUS_LOAD, "The load at a glance (for the web console)", protocol.LoadSummary),
    Endpoint(
        "get",
        paths.STATUS_EVENTS,
        "Deployment events as they happen (Server-Sent Events; Last-Event-ID resumes)",
        None,
        errors=(400,),
        events="event snapshot (GET /status body, first), phase, progress, outcome (deployment "
        "changes, with monotonic ids) and heartbeat; data is JSON",
    ),
    Endpoint(
        "get",
        paths.HEALTHZ,
        "Liveness probe (503 once the engine has died)",
        protocol.HealthResponse,
        errors=(503,),
    ),
    Endpoint(
        "get",
        paths.READYZ,
        "Readiness probe (200 only while a model serves)",
        protocol.HealthResponse,
        errors=(503,),
    ),
    Endpoint("get", paths.METRICS, "Prometheus metrics (text exposition format)", None),
)


def _sse_event(
    payloads: tuple[type[BaseModel], ...], done: bool = False, description: str = ""
) -> dict[str, Any]:
    """Schema of one event (OpenAPI 3.1 style): its ``data`` is JSON of one of ``payloads`` (else
    what ``description`` says), or the literal ``[DONE]`` when ``done``."""
    data: dict[str, Any] = {"type": "string"}
    if payloads:
        refs = [{"$ref": _REF.format(model=p.__name__)} for p in payloads]
        data |= {
            "contentMediaType": "application/json",
            "contentSchema": refs[0] if len(refs) == 1 else {"anyOf": refs},
        }
    else:
        data["description"] = description
    if done:
        data = {"anyOf": [data, {"type": "string", "const": "[DONE]"}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}


@cache
def document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [protocol.ErrorResponse]
    for e in ENDPOINTS:
        models += [m for m in (e.ok, e.request, *e.stream_events, *e.extra_ok.values()) if m is not None]
    _, schemas = models_json_schema([(m, "validation") for m in dict.fromkeys(models)], ref_template=_REF)
    spec_paths: dict[str, dict[str, Any]] = {}
    for e in ENDPOINTS:
        ok_content = _json(e.ok) if e.ok else {"text/plain": _TEXT}
        if e.stream_events:
            ok_content = {
                **ok_content,
                "text/event-stream": {"schema": _sse_event(e.stream_events, e.stream_done)},
            }
        if e.events:
            ok_content = {"text/event-stream": {"schema": _sse_event((), description=e.events)}}
        responses: dict[str, Any] = {str(e.ok_status): {"description": "OK", "content": ok_content}}
        for status, model in e.extra_ok.items():
            responses[str(status)] = {"description": "OK", "content": _json(model)}
        for status in e.errors:
            responses[str(status)] = {"description": "Error", "content": _json(protocol.ErrorResponse)}
        operation: dict[str, Any] = {"summary": e.summary, "responses": responses}
        if e.request is not None:
            operation["requestBody"] = {"required": True, "content": _json(e.request)}
        if e.admin:
            operation["security"] = [{"bearer": []}, {}]
        spec_paths.setdefault(e.path, {})[e.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "model-serving", "version": "0.1.0"},
        "paths": spec_paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@routes.get(paths.OPENAPI)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
