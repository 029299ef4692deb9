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
from tests.hub import postgres


@dataclass
class Hub:
    url: str
    alice: str
    bob: str


@pytest.fixture(scope="session")
def postgres_port() -> Iterator[int]:
    """One PostgreSQL server for the session (skipped, saying what to install, where there is none)."""
    bin_dir = postgres.binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql (make setup does)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'nightlab[postgres]'")
    with postgres.server(bin_dir) as port:
        yield port


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each hub test on both databases the hub supports: a SQLite file, and a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return postgres.fresh_database(request.getfixturevalue("postgres_port"))


def _serve(db_url: str, public_reads: bool) -> Iterator[Hub]:
    settings = HubSettings(db_url=db_url, public_reads=public_reads, max_bundle_bytes=64 * 1024)
    engine = db.open_database(settings.db_url)
    alice, bob = db.create_token(engine, "alice"), db.create_token(engine, "bob")
    with serve_in_thread(create_hub_app(settings, engine)) as server:
        yield Hub(server.url, alice, bob)


@pytest.fixture
def hub(db_url: str) -> Iterator[Hub]:
    yield from _serve(db_url, public_reads=True)


@pytest.fixture
def private_hub(db_url: str) -> Iterator[Hub]:
    yield from _serve(db_url, public_reads=False)


@pytest.fixture
def clients(hub: Hub) -> Iterator[tuple[HubClient, HubClient]]:
    with HubClient(hub.url, hub.alice) as alice, HubClient(hub.url, hub.bob) as bob:
        yield alice, bob
