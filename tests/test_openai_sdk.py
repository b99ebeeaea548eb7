"""The official ``openai`` SDK works unchanged against ``/v1`` (non-streaming and streaming)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.server_process import ServerProcess, running_server

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_a: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("sdk"), model=str(tiny_model_a)) as server:
        yield server


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_models_list(client: openai.OpenAI, tiny_model_a: Path) -> None:
    assert [m.id for m in client.models.list().data] == [str(tiny_model_a)]


def test_chat_completion(client: openai.OpenAI, tiny_model_a: Path) -> None:
    completion = client.chat.completions.create(
        model=str(tiny_model_a), messages=MESSAGES, max_tokens=5, temperature=0
    )
    assert completion.object == "chat.completion" and completion.model == str(tiny_model_a)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 5


def test_streaming_matches_non_streaming(client: openai.OpenAI, tiny_model_a: Path) -> None:
    args = {"model": str(tiny_model_a), "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8


def test_unknown_model_is_a_clean_sdk_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="someone/else", messages=MESSAGES)
    assert caught.value.status_code == 404


def test_bad_request_is_a_clean_sdk_error(client: openai.OpenAI, tiny_model_a: Path) -> None:
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=str(tiny_model_a), messages=[], max_tokens=5)


@pytest.fixture
def create(client: openai.OpenAI, tiny_model_a: Path) -> Callable[..., Any]:
    """``chat.completions.create`` on the served model."""
    return partial(client.chat.completions.create, model=str(tiny_model_a))


# --- valid OpenAI requests that other servers refuse (issue 12), answered as OpenAI does ---

QUESTION = "What is the capital of France?"


def reply(create: Callable[..., Any], messages: list[dict[str, Any]], **options: Any) -> str:
    options = {"max_tokens": 6, "temperature": 0, **options}
    content = create(messages=messages, **options).choices[0].message.content
    assert isinstance(content, str)
    return content


def test_content_as_text_parts_gives_the_answer_of_the_plain_string(create: Callable[..., Any]) -> None:
    plain = reply(create, [{"role": "user", "content": QUESTION}])
    assert reply(create, [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]) == plain


def test_empty_content_in_history_is_accepted(create: Callable[..., Any]) -> None:
    # The server itself answers "" when a stop string matches at once; a client appends it as is.
    history = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Hello", "name": "alice"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": QUESTION},
    ]
    reply(create, history)


def test_developer_role_is_the_system_role(create: Callable[..., Any]) -> None:
    instruction = "Answer in one word."
    as_system = reply(
        create, [{"role": "system", "content": instruction}, {"role": "user", "content": QUESTION}]
    )
    as_developer = [{"role": "developer", "content": instruction}, {"role": "user", "content": QUESTION}]
    assert reply(create, as_developer) == as_system


def test_seed_minus_one_and_top_p_zero(create: Callable[..., Any]) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    greedy = reply(create, messages)
    assert reply(create, messages, temperature=1.0, top_p=0) == greedy
    reply(create, messages, temperature=1.0, seed=-1)


def test_harmless_options_are_accepted_and_ignored(create: Callable[..., Any]) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    plain = reply(create, messages)
    harmless = {
        "user": "u-1",
        "metadata": {"team": "a"},
        "store": False,
        "service_tier": "auto",
        "n": 1,
        "logprobs": False,
        "presence_penalty": 0,
        "response_format": {"type": "text"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "none",
        "parallel_tool_calls": False,
        "temperature": None,  # null is "not given" in OpenAI's API
        "extra_body": {"an_option_from_elsewhere": 1, "top_k": -1},
    }
    assert reply(create, messages, **{**harmless, "temperature": 0}) == plain
    reply(create, messages, **harmless)


_TOOL = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"tools": _TOOL}, "tools"),
        ({"tools": _TOOL, "tool_choice": "required"}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
            "response_format",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type 'custom'"),
        (
            {"tools": _TOOL, "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice (no tool named 'g')",
        ),
        (
            {"tools": _TOOL, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format together with tools",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "Paris"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"extra_body": {"suffix": "!"}}, "suffix"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
        ({"extra_body": {"best_of": 3}}, "best_of"),
        ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    ],
)
def test_unhonoured_options_are_refused_naming_them(
    create: Callable[..., Any], options: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        create(messages=[{"role": "user", "content": QUESTION}], **options)
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "unsupported_option", error
    assert named in error["message"] and [named] in [d["loc"] for d in error["details"]]


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ({"role": "function", "name": "f", "content": "42"}, "messages[1].role 'function'"),
        (
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            "messages[1].function_call",
        ),
    ],
)
def test_legacy_function_history_is_refused_naming_it(
    create: Callable[..., Any], message: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        create(messages=[{"role": "user", "content": QUESTION}, message])
    assert named in caught.value.message


def test_non_text_content_parts_are_refused_naming_the_type(create: Callable[..., Any]) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as caught:
        create(messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}, image]}])
    error = caught.value.body
    assert (
        isinstance(error, dict) and error["type"] == "unsupported_content" and "image_url" in error["message"]
    )
