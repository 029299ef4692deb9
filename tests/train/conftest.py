"""Fixtures for the training service tests: one tiny model per test session, written to a temp dir."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest

from nightlab.train.tiny import make_tiny_model


@pytest.fixture(scope="session", autouse=True)
def offline_hub():
    """No test here may reach the Hugging Face hub, even where HF_HUB_OFFLINE=0 is exported: a model not on
    this machine must fail at once. The library reads the variable at import, so its flag is set too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama (hidden 64, 2 layers) with a ChatML tokenizer; a regular HF model directory."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")
