"""Fixtures for the training service tests: one tiny model per test session, written to a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab.train.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama (hidden 64, 2 layers) with a ChatML tokenizer; a regular HF model directory."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")
