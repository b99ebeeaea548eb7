"""Fuzzing: schemathesis drives every operation of /openapi.json against a real server (no 5xx,
every answer conforms to the document), and hypothesis probes the request validation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.api import paths
from service.api.protocol import MAX_STOP_SEQUENCES, CompletionRequest
from tests.server_process import running_server

_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_a: Path
) -> Iterator[schemathesis.BaseSchema]:
    # Small limits keep fuzzed generations short; the allowlist keeps fuzzed deployments from
    # converting the bundled model; no model root refuses local paths.
    args = (
        "--max-tokens-limit",
        "8",
        "--default-max-tokens",
        "4",
        "--allowed-models",
        "tiny-*",
        "--max-queued-requests",
        "256",
    )
    with running_server(tmp_path_factory.mktemp("fuzz"), model=str(tiny_model_a), args=args) as server:
        yield schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


# The event stream never ends by itself: tests/test_events.py covers it.
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path=paths.STATUS_EVENTS)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=_CHECKS, timeout=60)


# --- property-based validation of /completion bodies ---

_roles = st.sampled_from(["system", "user", "assistant", "developer"])
_text = st.text(max_size=50)
_content = _text | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}), min_size=1, max_size=3
)
_message = st.fixed_dictionaries(
    {"role": _roles, "content": _content}, optional={"name": st.text(min_size=1, max_size=8)}
)
_valid = st.fixed_dictionaries(
    {"messages": st.lists(_message, min_size=1, max_size=5)},
    optional={
        "max_tokens": st.integers(1, 4096),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "stop": st.lists(st.text(min_size=1, max_size=5), max_size=MAX_STOP_SEQUENCES),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stream": st.booleans(),
    },
)


@given(_valid)
def test_valid_bodies_are_accepted(body: dict) -> None:
    request = CompletionRequest.model_validate(body)
    assert len(request.messages) == len(body["messages"])
    for message, sent in zip(request.messages, body["messages"], strict=True):
        content = sent["content"]
        assert message.text() == (
            content if isinstance(content, str) else "\n".join(p["text"] for p in content)
        )
    assert request.stop_tuple() == tuple(body.get("stop") or ())


@given(
    _valid,
    st.sampled_from(
        [
            ("messages", []),
            ("max_tokens", 0),
            ("max_tokens", -5),
            ("temperature", 2.5),
            ("top_p", -0.1),
            ("stop", ["a"] * (MAX_STOP_SEQUENCES + 1)),
            ("stop", [""]),
            ("seed", 2**63),
            ("messages", [{"role": "tool", "content": "x"}]),
            ("messages", [{"role": "user", "content": []}]),
            ("messages", [{"role": "user", "content": [{"type": "text"}]}]),
            ("bogus", 1),
        ]
    ),
)
def test_each_invalid_field_is_rejected(body: dict, mutation: tuple[str, object]) -> None:
    key, value = mutation
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({**body, key: value})


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_arbitrary_json_never_crashes_validation(data: object) -> None:
    with contextlib.suppress(ValidationError):  # rejecting is fine; any other exception fails the test
        CompletionRequest.model_validate(data)
