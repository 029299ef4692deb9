"""A real hub over HTTP on a loopback port, with two users, for every hub test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nightlab.hub import db
from nightlab.hub.client import HubClient
from nightlab.hub.server import HubSettings, create_hub_app
from nightlab.train.api.background import serve_in_thread


@dataclass
class Hub:
    url: str
    alice: str
    bob: str


def _serve(tmp_path: Path, public_reads: bool) -> Iterator[Hub]:
    settings = HubSettings(
        db_url=f"sqlite:///{tmp_path / 'hub.db'}", public_reads=public_reads, max_bundle_bytes=64 * 1024
    )
    engine = db.open_database(settings.db_url)
    alice, bob = db.create_token(engine, "alice"), db.create_token(engine, "bob")
    with serve_in_thread(create_hub_app(settings, engine)) as server:
        yield Hub(server.url, alice, bob)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    yield from _serve(tmp_path, public_reads=True)


@pytest.fixture
def private_hub(tmp_path: Path) -> Iterator[Hub]:
    yield from _serve(tmp_path, public_reads=False)


@pytest.fixture
def clients(hub: Hub) -> Iterator[tuple[HubClient, HubClient]]:
    with HubClient(hub.url, hub.alice) as alice, HubClient(hub.url, hub.bob) as bob:
        yield alice, bob
