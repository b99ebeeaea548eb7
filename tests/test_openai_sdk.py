"""The official ``openai`` SDK works unchanged against ``/v1`` (non-streaming and streaming)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
