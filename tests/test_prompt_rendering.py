"""Prompt rendering and tokenizing: off the event loop, and a fault is told apart from bad input.

The served model is a tiny real one whose chat template refuses a conversation that opens with the
assistant (``raise_exception``, as real templates do for role order) and fails on a marker
message the way a buggy template would (an arithmetic error inside the template).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from service.api import keys
from service.app import TOKENIZER_THREADS
from tests.test_api import CHAT, assert_error, start
from tests.tiny_models import CHATML_TEMPLATE

#: Content that makes the template below fail with an error that is not the request's fault.
TEMPLATE_BUG = "divide by zero"
TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('Conversation roles must start with user or system') }}{% endif %}"
    f"{{% for message in messages %}}{{% if message['content'] == '{TEMPLATE_BUG}' %}}{{{{ 1 // 0 }}}}"
    "{% endif %}{% endfor %}" + CHATML_TEMPLATE
)


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path) -> TestClient:
    model = shutil.copytree(tiny_model_a, tmp_path / "tiny-picky-template")
    (model / "chat_template.jinja").write_text(TEMPLATE)
    return await start(aiohttp_client, tmp_path, model, max_prompt_tokens=64)


def user(content: str) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize("path", ["/completion", "/v1/chat/completions"])
async def test_a_template_refusing_the_messages_is_the_requests_fault(client: TestClient, path: str) -> None:
    body = {**CHAT, "messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]}
    response = await client.post(path, json=body)
    error = await response.json()
    assert_error(response.status, error, 422)
    assert "must start with user or system" in error["error"]["message"]


@pytest.mark.parametrize("path", ["/completion", "/v1/chat/completions"])
async def test_a_template_fault_is_a_500_for_that_request_only(client: TestClient, path: str) -> None:
    response = await client.post(path, json=user(TEMPLATE_BUG))
    assert_error(response.status, await response.json(), 500)
    assert (await client.post(path, json=user("Hello"))).status == 200


async def test_the_event_loop_serves_others_while_a_prompt_waits_for_tokenizing(client: TestClient) -> None:
    # Hold every tokenizer thread: a prompt can then only be rendered once they are released,
    # so whatever the server answers meanwhile was answered while that prompt was pending.
    release = threading.Event()
    pool = client.app[keys.TOKENIZER_POOL]
    held = [pool.submit(release.wait) for _ in range(TOKENIZER_THREADS)]
    big = {"messages": [{"role": "user", "content": "word " * 40_000}] * 5, "max_tokens": 4}
    pending = asyncio.create_task(client.post("/completion", json=big))
    try:
        for path in ("/healthz", "/readyz", "/v1/models", "/status"):
            assert (await client.get(path)).status == 200
        assert not pending.done()
    finally:
        release.set()
    response = await pending
    assert_error(response.status, await response.json(), 413)  # counted, then over max_prompt_tokens
    assert all(f.done() for f in held)
