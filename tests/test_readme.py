"""The README cannot rot: its curl examples run against a real server, its configuration table lists
exactly the server's settings.

What this module expects of README.md:

* **curl examples**: every command in a fenced ```` ```bash ```` block that starts with ``curl`` and
  targets ``http://localhost:8000`` (or ``127.0.0.1:8000``) is an example, run in README order
  against one server. One curl command per example (``\\`` line continuations are fine, pipes are
  not: show output in a separate block). It must answer 2xx, unless a comment line right above it
  says otherwise, e.g. ``# expect: 409``. An endless stream (``GET /status/events``) is marked
  ``# expect: stream``: it must answer 200 with Server-Sent Events before curl stops reading.
  The server requires an admin token: the POST /model
  example sends ``-H "Authorization: Bearer $SERVING_ADMIN_TOKEN"`` (bash expands it).
  Together the examples must call every path in ``service/api/paths.py``.
* **POST /model**: its example deploys ``README_HUB_MODEL``; offline, the test server has the tiny
  hub model in its place. Examples do not name the served model in a request's ``"model"`` field.
* **configuration table**: a Markdown table whose first header cell is ``Environment variable``,
  one row per setting, the variable in backticks in the first cell: ``| `SERVING_PORT` | ... |``.

With ``README_BASE_URL`` set (CI's e2e job, through a port-forward), the examples run as written
against that server, with the ``SERVING_ADMIN_TOKEN`` of the environment, instead of a local one.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.api import paths
from service.settings import ENV_PREFIX, Settings
from tests.conftest import TINY_HUB_ID
from tests.server_process import running_server

README = Path(__file__).resolve().parent.parent / "README.md"
#: The hub model the README's POST /model example deploys (CI's e2e job deploys it for real).
README_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
README_URL = re.compile(r"http://(?:localhost|127\.0\.0\.1):8000")
EXPECT = re.compile(r"#\s*expect:\s*(\d{3}|stream)")
CURL_TIMEOUT_S = 120
#: How long an endless stream's example is read.
STREAM_READ_S = 2
#: curl's exit code when --max-time stops it.
CURL_TIMED_OUT = 28


@dataclass(frozen=True)
class CurlExample:
    line: int  # in README.md, for the failure message
    command: str  # continuation lines joined
    expected_status: int | str | None  # None: any 2xx; "stream": 200, then read until STREAM_READ_S

    @property
    def id(self) -> str:
        method = re.search(r"(?:-X|--request)\s+(\w+)", self.command)
        verb = (
            method[1]
            if method
            else ("POST" if re.search(r"\s(?:-d|--data\S*|--json)\s", self.command) else "GET")
        )
        url = README_URL.search(self.command)
        path = self.command[url.end() :].split()[0].strip("'\"") if url else "?"
        return f"L{self.line} {verb} {path}"


def bash_blocks(markdown: str) -> Iterator[tuple[int, list[str]]]:
    """(line number of the first line, lines) of each ```bash fenced block."""
    block: list[str] | None = None
    start = 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        if block is None and line.strip() == "```bash":
            block, start = [], number + 1
        elif block is not None and line.strip() == "```":
            yield start, block
            block = None
        elif block is not None:
            block.append(line)


def curl_examples(markdown: str) -> list[CurlExample]:
    examples = []
    for start, lines in bash_blocks(markdown):
        expected: int | str | None = None
        index = 0
        while index < len(lines):
            line, number = lines[index].strip(), start + index
            index += 1
            if match := EXPECT.fullmatch(line):
                expected = int(match[1]) if match[1].isdigit() else match[1]
                continue
            parts = [line]
            while parts[-1].endswith("\\") and index < len(lines):
                parts[-1] = parts[-1][:-1]
                parts.append(lines[index].strip())
                index += 1
            command = " ".join(part.strip() for part in parts)
            if command.startswith("curl ") and README_URL.search(command):
                examples.append(CurlExample(number, command, expected))
            expected = None
    return examples


EXAMPLES = curl_examples(README.read_text())


def test_readme_has_curl_examples_for_every_endpoint() -> None:
    assert EXAMPLES, "README.md has no curl examples (see this module's docstring for the format)"
    for example in EXAMPLES:
        assert "|" not in example.command, f"README line {example.line}: one curl command, no pipe"
    endpoints = {value for name, value in vars(paths).items() if name.isupper() and value.startswith("/")}
    called = {
        path for path in endpoints for ex in EXAMPLES if re.search(rf":8000{re.escape(path)}\b", ex.command)
    }
    missing = sorted(endpoints - called)
    assert not missing, f"endpoints without a README curl example: {missing}"


@dataclass(frozen=True)
class Target:
    base_url: str
    substitutions: dict[str, str]
    env: dict[str, str]  # of the curl commands


@pytest.fixture(scope="module")
def readme_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    if base_url := os.environ.get("README_BASE_URL"):
        yield Target(base_url.rstrip("/"), {}, dict(os.environ))
        return
    # Tiny model A serves; the README's hub model resolves to tiny model B in an offline hub cache.
    model = request.getfixturevalue("tiny_model_a")
    server_env = {
        "HF_HOME": str(request.getfixturevalue("hf_home")),
        "SERVING_ADMIN_TOKEN": secrets.token_hex(16),
    }
    workdir = tmp_path_factory.mktemp("readme")
    with running_server(workdir, model=str(model), env=server_env) as server:
        yield Target(server.base_url, {README_HUB_MODEL: TINY_HUB_ID}, {**os.environ, **server_env})


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.id for example in EXAMPLES])
def test_readme_curl_example(example: CurlExample, readme_target: Target, tmp_path: Path) -> None:
    command = README_URL.sub(readme_target.base_url, example.command)
    for old, new in readme_target.substitutions.items():
        command = command.replace(old, new)
    body = tmp_path / "body"
    # Our options go first; the README's own follow, as written.
    streams = example.expected_status == "stream"
    max_time = STREAM_READ_S if streams else CURL_TIMEOUT_S
    options = f"-sS -o {shlex.quote(str(body))} -w '%{{http_code}}' --max-time {max_time}"
    result = subprocess.run(
        ["bash", "-c", command.replace("curl ", f"curl {options} ", 1)],
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT_S + 30,
        env=readme_target.env,
        check=False,
    )
    answer = body.read_text(errors="replace")[:2000] if body.exists() else ""
    ok_exit = CURL_TIMED_OUT if streams else 0
    assert result.returncode == ok_exit, f"README line {example.line}: curl failed: {result.stderr}"
    status = int(result.stdout)
    if streams:
        assert status == 200 and answer.startswith("event: snapshot\n"), (
            f"README line {example.line}: {answer}"
        )
    elif example.expected_status is None:
        assert 200 <= status < 300, f"README line {example.line}: {status} {answer}"
    else:
        assert status == example.expected_status, f"README line {example.line}: {status} {answer}"


def _configuration_rows(markdown: str) -> list[str]:
    """First cells of the body rows of the table headed ``Environment variable``."""
    rows: list[str] | None = None
    for line in markdown.splitlines():
        cells = (
            [cell.strip() for cell in line.strip().strip("|").split("|")]
            if line.lstrip().startswith("|")
            else []
        )
        if rows is None:
            if cells and cells[0].lower() == "environment variable":
                rows = []
        elif not cells:
            break
        elif not set(cells[0]) <= set("-: "):  # the header separator row
            rows.append(cells[0])
    assert rows is not None, "README.md has no table headed 'Environment variable'"
    return rows


def test_readme_configuration_table_lists_every_setting() -> None:
    rows = _configuration_rows(README.read_text())
    documented = [match[1] if (match := re.fullmatch(r"`(\w+)`", row)) else row for row in rows]
    expected = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert len(documented) == len(set(documented)), f"listed twice: {documented}"
    missing, unknown = sorted(expected - set(documented)), sorted(set(documented) - expected)
    assert not missing and not unknown, f"configuration table: missing {missing}, not settings {unknown}"
