"""OpenAI API parity on a real server process (tiny float32 model): logprobs, n, the legacy
completions API through the official SDK, penalties and logit_bias, /tokenize and /detokenize,
X-Request-Id."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.metrics import PROMPT_TOKENS_TOTAL
from tests.server_process import ServerProcess, running_server
from tests.test_reliability import metric, wait_until

MESSAGES = [{"role": "user", "content": "the quick brown fox"}]
PROMPT = "the quick brown fox jumps"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_a: Path) -> Iterator[ServerProcess]:
    args = ("--dtype", "float32", "--max-n", "4", "--max-running-requests", "8")
    with running_server(tmp_path_factory.mktemp("parity"), model=str(tiny_model_a), args=args) as server:
        yield server


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(tiny_model_a: Path) -> str:
    return str(tiny_model_a)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_a: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_a)


def greedy_reference(model_path: Path, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """log-softmax rows of a direct, cache-free forward pass of the model at each greedy step."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokens, rows = list(prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            row = model(input_ids=torch.tensor([tokens])).logits[0, -1].float().log_softmax(-1)
            rows.append(row)
            tokens.append(int(row.argmax()))
    return rows


def post(http: httpx.Client, path: str, **body: Any) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def sse(http: httpx.Client, path: str, **body: Any) -> list[Any]:
    """The events of a streamed answer (``[DONE]`` as a string)."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


# ----------------------------------------------------------------------------- logprobs


def test_chat_logprobs_equal_a_direct_forward_pass(
    client: openai.OpenAI, http: httpx.Client, model_id: str, tokenizer: Any, tiny_model_a: Path
) -> None:
    args = {"model": model_id, "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    completion = client.chat.completions.create(**args, logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert content is not None and len(content) == completion.usage.completion_tokens == 5
    rows = greedy_reference(tiny_model_a, post(http, "/tokenize", messages=MESSAGES)["tokens"], 5)
    for entry, row in zip(content, rows, strict=True):
        token_id = int(row.argmax())
        assert entry.token == tokenizer.decode([token_id])
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
        assert entry.logprob == pytest.approx(float(row[token_id]), abs=1e-3)
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert top == pytest.approx(row.topk(3).values.tolist(), abs=1e-3)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in row.topk(3).indices]

    stream = client.chat.completions.create(**args, logprobs=True, top_logprobs=3, stream=True)
    streamed = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content or []]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    plain = client.chat.completions.create(**args)
    assert plain.choices[0].logprobs is None
    # The prompt was prefilled before: the prefix cache kept its keys, values and next-token logits.
    details = plain.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == plain.usage.prompt_tokens
    assert plain.choices[0].message.content == completion.choices[0].message.content


def test_completion_endpoint_logprobs_streamed_and_not_agree(http: httpx.Client) -> None:
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = post(http, "/completion", **body)
    assert len(whole["logprobs"]["content"]) == whole["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 2 for t in whole["logprobs"]["content"])
    streamed = [
        t for e in sse(http, "/completion", **body) if "logprobs" in e for t in e["logprobs"]["content"]
    ]
    assert streamed == whole["logprobs"]["content"]
    refused = http.post("/completion", json={**body, "logprobs": False})
    assert refused.status_code == 422 and "top_logprobs" in refused.json()["error"]["message"]


# ----------------------------------------------------------------------------- n


def test_n_choices_are_seeded_reproducible_and_prefill_once(
    client: openai.OpenAI, server: ServerProcess, model_id: str
) -> None:
    args = {"model": model_id, "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0, "seed": 5}
    one = client.chat.completions.create(**args)
    before = metric(server, PROMPT_TOKENS_TOTAL)
    first = client.chat.completions.create(**args, n=3)
    prefilled = metric(server, PROMPT_TOKENS_TOTAL) - before
    second = client.chat.completions.create(**args, n=3)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices] and len(set(texts)) > 1
    assert first.usage.prompt_tokens == one.usage.prompt_tokens == prefilled  # the prompt once
    assert first.usage.completion_tokens > one.usage.completion_tokens  # every choice's tokens
    assert texts[0] == one.choices[0].message.content  # choice 0 samples with the seed itself

    chunks = list(client.chat.completions.create(**args, n=3, stream=True))
    streamed = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_n_over_the_limit_is_refused(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="n must be at most 4"):
        client.chat.completions.create(model=model_id, messages=MESSAGES, n=5)


# ----------------------------------------------------------------------------- legacy completions


def test_legacy_completions_with_the_sdk(client: openai.OpenAI, model_id: str, tokenizer: Any) -> None:
    args = {"model": model_id, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    plain = client.completions.create(**args)
    assert plain.object == "text_completion" and plain.choices[0].logprobs is None
    assert plain.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    echoed = client.completions.create(**args, echo=True, logprobs=2)
    choice = echoed.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text and choice.finish_reason in ("stop", "length")
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and "".join(lp.tokens).startswith(PROMPT)

    chunks = list(client.completions.create(**args, echo=True, logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [v for s in streamed for v in s.token_logprobs] == pytest.approx(lp.token_logprobs)
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


def test_legacy_prompt_lists_token_ids_and_n(client: openai.OpenAI, model_id: str, tokenizer: Any) -> None:
    ids = tokenizer(PROMPT)["input_ids"]
    args = {"model": model_id, "max_tokens": 4, "temperature": 0}
    by_text = client.completions.create(**args, prompt=PROMPT)
    by_ids = client.completions.create(**args, prompt=ids, echo=True)
    assert by_ids.choices[0].text == PROMPT + by_text.choices[0].text
    several = client.completions.create(**args, prompt=[ids, ids[:3]], n=2, best_of=2)
    with pytest.raises(openai.UnprocessableEntityError, match="over the 72 sequences"):
        client.completions.create(**args, prompt=["a"] * 19, n=4)  # 8 slots + 64 queued hold 72
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == by_text.choices[0].text
    assert several.usage.prompt_tokens == len(ids) + 3
    strings = client.completions.create(
        **args, prompt=[PROMPT, "hello"], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(strings)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(ids) + len(
        tokenizer("hello")["input_ids"]
    )


@pytest.mark.parametrize(("extra", "named"), [({"suffix": "!"}, "suffix"), ({"best_of": 3}, "best_of")])
def test_legacy_unhonoured_options_are_refused(
    client: openai.OpenAI, model_id: str, extra: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=named):
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=2, **extra)


# ----------------------------------------------------------------------------- logits processors


def test_logit_bias_and_penalties_change_the_output(
    client: openai.OpenAI, http: httpx.Client, model_id: str
) -> None:
    args = {"model": model_id, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    greedy = client.completions.create(**args).choices[0].logprobs.tokens
    forced = client.completions.create(**args, logit_bias={"42": 100}).choices[0].logprobs.tokens
    assert forced == [post(http, "/detokenize", tokens=[42])["prompt"]] * 6 != greedy
    assert len(set(greedy)) < len(greedy), "the tiny model's greedy output repeats a token"
    for penalty in (
        {"frequency_penalty": 2},
        {"presence_penalty": 2},
        {"extra_body": {"repetition_penalty": 2}},
    ):
        assert client.completions.create(**args, **penalty).choices[0].logprobs.tokens != greedy, penalty
    with pytest.raises(openai.UnprocessableEntityError, match="vocabulary"):
        client.completions.create(**args, logit_bias={"100000": 5})


# ----------------------------------------------------------------------------- tokenize, request ids


def test_tokenize_detokenize_round_trip(client: openai.OpenAI, http: httpx.Client, model_id: str) -> None:
    tokenized = post(http, "/tokenize", prompt=PROMPT, return_token_strs=True)
    assert tokenized["count"] == len(tokenized["tokens"]) > 1 and tokenized["max_model_len"] > 0
    assert "".join(tokenized["token_strs"]) == PROMPT
    assert post(http, "/detokenize", tokens=tokenized["tokens"]) == {"prompt": PROMPT}
    chat = post(http, "/tokenize", messages=MESSAGES)
    usage = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 422
    assert http.post("/tokenize", json={"prompt": "a", "messages": MESSAGES}).status_code == 422


def test_x_request_id_is_honoured_and_echoed(http: httpx.Client) -> None:
    chat = {"messages": MESSAGES, "max_tokens": 2}
    response = http.post("/v1/chat/completions", json=chat, headers={"X-Request-Id": "trace-42"})
    assert response.headers["X-Request-Id"] == "trace-42" and response.json()["id"] == "chatcmpl-trace-42"
    with http.stream(
        "POST", "/v1/completions", json={"prompt": PROMPT, "stream": True}, headers={"X-Request-Id": "s-1"}
    ) as streamed:
        assert streamed.headers["X-Request-Id"] == "s-1"
    generated = http.get("/v1/models").headers["X-Request-Id"]
    assert generated and generated != http.get("/v1/models").headers["X-Request-Id"]
    missing = http.post(
        "/v1/chat/completions", json={**chat, "model": "other"}, headers={"X-Request-Id": "e-1"}
    )
    assert missing.status_code == 404 and missing.headers["X-Request-Id"] == "e-1"
    bad = http.post("/v1/chat/completions", json=chat, headers={"X-Request-Id": "no spaces\tplease"})
    assert bad.status_code == 400 and "X-Request-Id" in bad.json()["error"]["message"]


def test_a_client_going_away_cancels_every_choice(server: ServerProcess, http: httpx.Client) -> None:
    cancelled = functools.partial(
        metric, server, "serving_requests_cancelled_total", reason="client_disconnected"
    )
    before = cancelled()
    body = {"messages": MESSAGES, "max_tokens": 2000, "n": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
    wait_until(lambda: cancelled() == before + 3, what="three choices cancelled")
    wait_until(lambda: metric(server, "serving_num_requests_running") == 0, what="slots freed")
