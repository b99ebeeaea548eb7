"""Structured outputs and tool calls through the official ``openai`` SDK against real server processes
on tiny models: JSON-schema outputs always validate (also in a batch with free requests), forced tool
calls always parse and validate, tool results round-trip, streamed tool calls reassemble into the
non-streamed call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from service.api.tool_calls import ToolCallParser
from service.settings import BUNDLED_MODEL_ALIAS
from tests.server_process import ServerProcess, running_server
from tests.test_engine_grammar import SCHEMA

ASK = [{"role": "user", "content": "Describe a user as JSON."}]

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_a: Path) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("structured"), model=str(tiny_model_a), args=("--max-running-requests", "24")
    ) as server:
        yield server


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory: pytest.TempPathFactory, tiny_tools_model: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("tools"), model=str(tiny_tools_model)) as server:
        yield server


class Chat:
    """``chat.completions.create`` on the model a server serves."""

    def __init__(self, server: ServerProcess) -> None:
        self.client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        self.model = self.client.models.list().data[0].id
        self.completions = self

    def create(self, **options: Any) -> Any:
        return self.client.chat.completions.create(model=self.model, **options)


def client_of(server: ServerProcess) -> Any:
    """Stands in for an ``openai.OpenAI`` client (``.chat.completions.create``) with the model set."""
    chat = Chat(server)
    return type("Client", (), {"chat": chat})()


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "user", "schema": schema, "strict": True}}


async def test_json_schema_validates_for_20_seeds_mixed_with_free_requests(server: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    model = Chat(server).model
    constrained = [
        client.chat.completions.create(
            model=model,
            messages=ASK,
            temperature=1,
            seed=seed,
            max_tokens=400,
            response_format=json_schema_format(SCHEMA),
        )
        for seed in range(20)
    ]
    free = [
        client.chat.completions.create(model=model, messages=ASK, temperature=1, seed=seed, max_tokens=8)
        for seed in range(4)
    ]
    answers = await asyncio.gather(*constrained, *free)
    for answer in answers[:20]:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    for answer in answers[20:]:
        assert answer.choices[0].finish_reason == "length"


def test_json_object_is_valid_json(server: ServerProcess) -> None:
    for seed in range(3):
        choice = (
            client_of(server)
            .chat.completions.create(
                messages=ASK,
                temperature=1,
                seed=seed,
                max_tokens=2000,
                response_format={"type": "json_object"},
            )
            .choices[0]
        )
        assert choice.finish_reason == "stop"
        assert isinstance(json.loads(choice.message.content), dict)


def test_unsupported_schema_feature_is_a_400_naming_it(server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "dependentSchemas": {"a": {}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client_of(server).chat.completions.create(messages=ASK, response_format=json_schema_format(schema))
    assert "response_format" in caught.value.message and "dependentSchemas" in caught.value.message


def test_tools_with_a_template_that_ignores_them_is_a_400(server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client_of(server).chat.completions.create(messages=QUESTION, tools=TOOLS)
    assert "tools" in caught.value.message and "template" in caught.value.message


def assert_valid_call(call: Any, name: str | None = None) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert name in (None, call.function.name) and call.function.name in PARAMETERS
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_tool_choice_makes_a_valid_call(tools_server: ServerProcess, seed: int) -> None:
    choice = (
        client_of(tools_server)
        .chat.completions.create(
            messages=QUESTION,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=1,
            seed=seed,
            max_tokens=300,
        )
        .choices[0]
    )
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert_valid_call(call, "get_weather")


def test_required_tool_choice_calls_one_of_the_tools(tools_server: ServerProcess) -> None:
    client = client_of(tools_server)
    for seed in range(3):
        choice = client.chat.completions.create(
            messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=1, seed=seed, max_tokens=300
        ).choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert_valid_call(call)


def test_auto_tool_choice_answers_text_or_valid_calls(tools_server: ServerProcess) -> None:
    for seed in range(3):
        choice = (
            client_of(tools_server)
            .chat.completions.create(messages=QUESTION, tools=TOOLS, temperature=1, seed=seed, max_tokens=24)
            .choices[0]
        )
        if choice.message.tool_calls:  # a random tiny model rarely writes a call of its own
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                assert call.type == "function" and json.loads(call.function.arguments) is not None
        else:
            assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)


def test_a_tool_call_in_the_text_is_parsed_whole_or_streamed() -> None:
    text = 'Let me check. <tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    whole = ToolCallParser(None)
    content, calls = whole.feed(text)
    assert content == "Let me check. " and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {"zone": "UTC"})
    ]
    streamed = ToolCallParser(None)
    pieces = [streamed.feed(text[i : i + 3]) for i in range(0, len(text), 3)] + [streamed.finish()]
    assert "".join(p[0] for p in pieces) == content
    assert [(c.name, c.arguments) for p in pieces for c in p[1]] == [(c.name, c.arguments) for c in calls]
    # Not a call (invalid JSON, not an object with a name, never closed): the text stays content.
    for broken in (
        "a <tool_call>{oops</tool_call> b",
        "<tool_call>[1]</tool_call>",
        '<tool_call>{"name": "f"}',
    ):
        for size in (3, len(broken)):
            parser = ToolCallParser(None)
            pieces = [parser.feed(broken[i : i + size]) for i in range(0, len(broken), size)]
            pieces.append(parser.finish())
            assert "".join(p[0] for p in pieces) == broken and not parser.calls


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = "".join(
        f'<tool_call>{{"name": "get_time", "arguments": {{"zone": "{zone}"}}}}</tool_call>'
        for zone in ("UTC", "CET")
    )
    for max_calls, zones in ((None, ["UTC", "CET"]), (1, ["UTC"])):
        parser = ToolCallParser(None, max_calls)
        content, calls = parser.feed(text)
        assert content == "" and [json.loads(c.arguments)["zone"] for c in calls] == zones


def test_tool_result_round_trip(tools_server: ServerProcess) -> None:
    client = client_of(tools_server)
    first = client.chat.completions.create(
        messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300
    ).choices[0]
    [call] = first.message.tool_calls
    history = [
        *QUESTION,
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(messages=history, tools=TOOLS, temperature=0, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_streamed_tool_call_reassembles_into_the_non_streamed_one(tools_server: ServerProcess) -> None:
    client = client_of(tools_server)
    args: dict[str, Any] = {
        "messages": QUESTION,
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 1,
        "seed": 5,
        "max_tokens": 300,
    }
    [whole] = client.chat.completions.create(**args).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**args, stream=True))
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert calls == {0: {"name": whole.function.name, "arguments": whole.function.arguments}}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


@pytest.mark.slow
def test_bundled_model_answers_json_that_validates(tmp_path: Path) -> None:
    with running_server(tmp_path, model=BUNDLED_MODEL_ALIAS, ready_timeout_s=600) as server:
        chat = client_of(server).chat.completions
        for seed in range(3):
            choice = chat.create(
                messages=ASK,
                temperature=1,
                seed=seed,
                max_tokens=300,
                response_format=json_schema_format(SCHEMA),
            ).choices[0]
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
