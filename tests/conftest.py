"""Shared fixtures: tiny real models (built once per session) and an offline HuggingFace cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline before transformers/huggingface_hub are imported anywhere in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny_models import HERMES_TOOLS_TEMPLATE, build_tiny_model, install_in_hub_cache

TINY_HUB_ID = "tiny-org/tiny-chat-b"


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the tiny local models (what ``SERVING_MODEL_ROOT`` points at in tests)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model_a(models_root: Path) -> Path:
    return build_tiny_model(models_root / "tiny-a", seed=1)


@pytest.fixture(scope="session")
def tiny_model_b(models_root: Path) -> Path:
    return build_tiny_model(models_root / "tiny-b", seed=2)


@pytest.fixture(scope="session")
def tiny_tools_model(models_root: Path) -> Path:
    """A tiny model whose chat template renders tools (Hermes-style, as Qwen's and SmolLM's)."""
    return build_tiny_model(models_root / "tiny-tools", seed=3, chat_template=HERMES_TOOLS_TEMPLATE)


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory: pytest.TempPathFactory, tiny_model_b: Path) -> Path:
    """An HF_HOME whose hub cache holds ``TINY_HUB_ID`` (tiny model B), resolvable offline."""
    home = tmp_path_factory.mktemp("hf_home")
    install_in_hub_cache(tiny_model_b, home, TINY_HUB_ID)
    return home
