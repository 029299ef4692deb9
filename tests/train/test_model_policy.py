"""Which models a server serves: prepared, preloaded or allowed ones only, named alike in every refusal,
and no more of them in memory than configured (real HTTP against a real server where a client is involved)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from nightlab.train import models
from nightlab.train.engine import Engine
from nightlab.train.errors import EngineError
from nightlab.train.records import LoraSpec
from nightlab.train.settings import ServeSettings
from tests.train.test_tinker_api import ALICE, Server, post, start_server, wait_future


def create_model(server: Server, base_model: str) -> httpx.Response:
    session = post(server, "create_session", json={"tags": [], "sdk_version": "x", "user_metadata": None})
    body = {"session_id": session.json()["session_id"], "model_seq_id": 0, "base_model": base_model}
    return post(server, "create_model", json={**body, "lora_config": {"rank": 4}})


def refusals(server: Server, name: str) -> list[tuple[int, str]]:
    """What the Tinker and OpenAI routes answer for model `name`, with the name itself blanked out."""
    tinker_create = create_model(server, name)
    tinker_sample = post(
        server,
        "asample",
        json={"base_model": name, "prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {}},
    )
    openai = httpx.post(
        f"{server.url}/v1/completions",
        headers={"Authorization": f"Bearer {ALICE}"},
        json={"model": name, "prompt": "hi", "max_tokens": 1},
        timeout=30,
    )
    answers = [
        (tinker_create.status_code, tinker_create.json()["error"]),
        (tinker_sample.status_code, tinker_sample.json()["error"]),
        (openai.status_code, openai.json()["error"]["message"]),
    ]
    return [(status, message.replace(repr(name), "<name>")) for status, message in answers]


def test_path_probing_gets_one_answer_whatever_exists(server, tiny_model_dir: Path, tmp_path: Path) -> None:
    unlisted = tmp_path / "unlisted-model"
    shutil.copytree(tiny_model_dir, unlisted)  # a real model directory the operator did not allow
    (tmp_path / "plain-dir").mkdir()
    probes = [str(unlisted), str(tmp_path / "plain-dir"), "/etc", str(tmp_path / "missing"), "../../etc"]
    answers = [refusals(server, probe) for probe in probes]
    assert all(a == answers[0] for a in answers), answers
    assert [status for status, _ in answers[0]] == [400, 400, 404]
    assert all("is not served here" in message for _, message in answers[0])
    assert all(str(tiny_model_dir.resolve()) in message for _, message in answers[0])


def test_a_hub_id_is_refused_without_opening_anything(server, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("a client's model name must not be loaded or fetched")

    monkeypatch.setattr(models, "load", never)
    monkeypatch.setattr(models, "describe", never)
    refused = create_model(server, "acme/some-model")
    assert refused.status_code == 400, refused.text
    assert "'acme/some-model' is not served here" in refused.json()["error"]


def test_prepared_and_allowed_models_are_served(server, tiny_model_dir: Path, tmp_path: Path) -> None:
    prepared = models.models_dir(server.data_dir) / "org--tiny"
    shutil.copytree(tiny_model_dir, prepared)  # prepared while the server runs: served at once
    alias = tmp_path / "alias"
    alias.symlink_to(tiny_model_dir)
    for name in ("org/tiny", str(prepared), str(tiny_model_dir), str(alias)):
        created = create_model(server, name)
        assert created.status_code == 200, (name, created.text)
        assert "model_id" in wait_future(server, created.json()["request_id"]).json()
    listed = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {ALICE}"}).json()
    assert {str(prepared.resolve()), str(tiny_model_dir.resolve())} <= {m["id"] for m in listed["data"]}


def test_least_recently_used_idle_bases_are_unloaded_and_reload_on_demand(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    names = []
    for name in ("a", "b", "c"):
        shutil.copytree(tiny_model_dir, models.models_dir(tmp_path) / name)
        names.append(str((models.models_dir(tmp_path) / name).resolve()))
    a, b, c = names
    engine = Engine(tmp_path, device="cpu", precision="fp32", show_progress=False)
    srv = start_server(tmp_path, str(tiny_model_dir), engine, max_loaded_bases=1)
    try:

        def sample(base: str) -> None:
            body = {"base_model": base, "prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {}}
            accepted = post(srv, "asample", json=body)
            assert accepted.status_code == 200, accepted.text
            assert wait_future(srv, accepted.json()["request_id"]).status_code == 200

        sample(a)
        sample(b)
        assert engine.loaded() == [b]  # a was unloaded
        created = create_model(srv, c)
        wait_future(srv, created.json()["request_id"])
        sample(a)  # reloaded on demand; c has a training client, so it stays
        assert engine.loaded() == [c, a]
        sample(b)
        assert engine.loaded() == [c, b]
    finally:
        srv.stop()


def test_bases_loaded_before_serving_count_as_preloaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = Engine(tmp_path, device="cpu", precision="fp32", show_progress=False)
    engine.create_adapter("x", str(tiny_model_dir), LoraSpec(rank=4, seed=0))
    engine.serve_only([], max_loaded_bases=1)  # what it loaded counts as preloaded
    assert engine.canonical_name(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    with pytest.raises(EngineError, match="is not served here"):
        engine.canonical_name(str(tmp_path))


def test_catalog_refuses_an_allowed_name_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(models.UnknownModelError, match="unknown model"):
        models.ModelCatalog(tmp_path, [str(tmp_path / "nothing-here")])


def test_max_loaded_bases_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_loaded_bases must be at least 1"):
        ServeSettings(data_dir=tmp_path, max_loaded_bases=0)
