"""Fixtures for the training service tests: one tiny model per test session, written to a temp dir, and a
module's service (`server`, serving `served_model`) with Alice's client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import tinker

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


@pytest.fixture(scope="module")
def served_model(tiny_model_dir: Path) -> str:
    """The base model `server` serves; a module serving another (a VLM, an MoE) overrides it."""
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, served_model: str) -> Iterator:
    """`nightlab serve` on a free port for one test module, with the default settings."""
    from tests.train.test_tinker_api import start_server

    srv = start_server(tmp_path_factory.mktemp("serve"), served_model)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(server) -> Iterator[tinker.ServiceClient]:
    """Alice's official tinker client on the module's service."""
    from tests.train.test_tinker_api import ALICE

    client = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    yield client
    client.close("success").result()
