"""Fixtures for the recipe tests: the tiny model, and a real training service on 127.0.0.1 serving it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nightlab.train.tiny import make_tiny_model

API_KEY = "tml-recipes-key"


@dataclass
class Service:
    url: str
    api_key: str
    data_dir: Path

    def session_outcomes(self) -> list[str]:
        """How each finished session ended (success, errored, interrupted), oldest first, from the service's
        db."""
        import json
        import sqlite3

        with sqlite3.connect(self.data_dir / "service.db") as db:
            statuses = [
                json.loads(row[0]) for row in db.execute("SELECT status FROM sessions ORDER BY rowid")
            ]
        return [s["reason"]["type"] for s in statuses if s["type"] == "client_finished"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@contextmanager
def running_service(data_dir: Path, allowed: tuple[Path, ...] = ()) -> Iterator[Service]:
    """`nightlab serve`'s app under uvicorn in a thread on a free port, with one API key, serving the models
    prepared in `data_dir` and the `allowed` model directories."""
    from nightlab.train.api.app import create_app
    from nightlab.train.api.background import serve_in_thread
    from nightlab.train.engine import Engine
    from nightlab.train.settings import ServeSettings

    settings = ServeSettings(
        data_dir=data_dir, device="cpu", api_keys=[API_KEY], allowed_models=[str(p) for p in allowed]
    )
    with serve_in_thread(create_app(settings, Engine(data_dir, device="cpu", show_progress=False))) as server:
        yield Service(server.url, API_KEY, data_dir)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("serve"), allowed=(tiny_model,)) as svc:
        yield svc
