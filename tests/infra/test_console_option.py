"""The web console's switch in the constructs and ``synth.py``: on by default, off on request."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import synth
from infra_constructs.model_server import env_name


def console_env(out: Path, *options: str) -> Any:
    files = synth.main(["--out", str(out), "--no-monitoring", *options])
    [deployment] = [
        doc
        for path in files
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "Deployment"
    ]
    [server] = deployment["spec"]["template"]["spec"]["containers"]
    return {var["name"]: var.get("value") for var in server["env"]}[env_name("console")]


@pytest.mark.parametrize(("options", "expected"), [((), "true"), (("--no-console",), "false")])
def test_console_setting_reaches_the_server(tmp_path: Path, options: tuple[str, ...], expected: str) -> None:
    assert console_env(tmp_path, *options) == expected
