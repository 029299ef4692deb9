"""`nightlab hub token create` prints a token the hub accepts; `[hub] url` in nightlab.toml joins a run."""

from __future__ import annotations

from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.hub.client import HubClient
from nightlab.hub.poster import join_hub
from nightlab.hub.server import HubSettings, create_hub_app
from nightlab.train.api.background import serve_in_thread
from tests.hub.test_server import IDENTITY, _result
from tests.research.loop_workspace import make_workspace


def test_a_created_token_is_printed_once_and_accepted(tmp_path):
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    done = CliRunner().invoke(app, ["hub", "token", "create", "carol", "--db", url])
    assert done.exit_code == 0, done.output
    token = done.output.strip()
    assert token not in (tmp_path / "hub.db").read_bytes().decode("latin-1")
    with (
        serve_in_thread(create_hub_app(HubSettings(db_url=url))) as server,
        HubClient(server.url, token) as carol,
    ):
        carol.post_result(_result("a" * 40, None, 1.0))
        assert carol.results(IDENTITY)[0]["user"] == "carol"


def test_the_hub_url_in_the_config_joins_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTLAB_CACHE_DIR", str(tmp_path / "cache"))
    root = make_workspace(tmp_path, config={"hub": {"url": "http://127.0.0.1:1"}})
    assert join_hub(root, None, "token").client.url == "http://127.0.0.1:1"
    assert join_hub(make_workspace(tmp_path / "plain"), None, None) is None
