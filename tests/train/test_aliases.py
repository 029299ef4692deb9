"""Served aliases over real HTTP: a stable /v1 name moved atomically between checkpoints, rolled back one
promotion at a time, private to its key, and kept across restarts."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
import tinker

from nightlab.train.aliases import AliasStore
from nightlab.train.api.app import create_app
from nightlab.train.api.background import serve_in_thread
from nightlab.train.engine import Engine
from nightlab.train.settings import ServeSettings

KEY, OTHER = "tml-alias-owner", "tml-alias-other"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def served(tiny_model_dir, data_dir, tmp_path_factory):
    """(url, base model, two sampler checkpoints of KEY)."""
    engine = Engine(tmp_path_factory.mktemp("engine"), device="cpu", precision="fp32", show_progress=False)
    base = str(tiny_model_dir)
    settings = ServeSettings(data_dir=data_dir, device="cpu", api_keys=[KEY, OTHER], allowed_models=[base])
    with serve_in_thread(create_app(settings, engine)) as srv:
        service = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
        paths = []
        for seed, name in ((1, "first"), (2, "second")):
            trainer = service.create_lora_training_client(base_model=base, rank=4, seed=seed).result()
            paths.append(trainer.save_weights_for_sampler(name).result().path)
        yield srv.url, base, paths
        service.close("success").result()


def _api(url: str, key: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(
        method, f"{url}/v1{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw
    )


def _answered_by(url: str, key: str, model: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    return out.model


def test_an_alias_moves_between_checkpoints_and_rolls_back_one_promotion_at_a_time(served, data_dir):
    url, base, (first, second) = served
    for target, why in ((base, "the base"), (first, "round 1 won"), (second, "round 2 won")):
        moved = _api(url, KEY, "PUT", "/aliases/assistant-latest", json={"model": target, "reason": why})
        assert moved.status_code == 200 and moved.json()["model"] == target
        assert _answered_by(url, KEY, "assistant-latest") == target  # the very next request uses it
    assert "assistant-latest" in [m["id"] for m in _api(url, KEY, "GET", "/models").json()["data"]]

    back = _api(url, KEY, "POST", "/aliases/assistant-latest/rollback", json={"reason": "reward hacked"})
    assert back.json()["model"] == first and back.json()["reason"] == f"rollback from {second}: reward hacked"
    assert _answered_by(url, KEY, "assistant-latest") == first
    assert _api(url, KEY, "POST", "/aliases/assistant-latest/rollback").json()["model"] == base
    stuck = _api(url, KEY, "POST", "/aliases/assistant-latest/rollback")
    assert stuck.status_code == 409 and "no earlier target" in stuck.json()["error"]["message"]

    history = _api(url, KEY, "GET", "/aliases/assistant-latest").json()["history"]
    assert [(h["kind"], h["model"]) for h in history] == [
        ("rollback", base),
        ("rollback", first),
        ("set", second),
        ("set", first),
        ("set", base),
    ]
    store = AliasStore(data_dir)  # what a restarted server reads
    try:
        assert store.current("alias-owner-is-not-this", "assistant-latest") is None
        assert [a.name for a in store.names(_owner(store))] == ["assistant-latest"]
    finally:
        store.close()


def _owner(store: AliasStore) -> str:
    """The one owner the store knows (how keys map to owners is the session store's business)."""
    return store.db.execute("SELECT DISTINCT owner FROM alias_moves").fetchone()["owner"]


def test_aliases_are_private_to_their_key_and_nonsense_is_refused(served):
    url, base, (first, _) = served
    assert _api(url, KEY, "PUT", "/aliases/mine", json={"model": first}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _answered_by(url, OTHER, "mine")  # another key's alias is no model to it
    assert _api(url, OTHER, "GET", "/aliases/mine").status_code == 404
    assert (
        _api(url, OTHER, "PUT", "/aliases/theirs", json={"model": first}).status_code == 404
    )  # not its ckpt
    assert _api(url, OTHER, "POST", "/aliases/mine/rollback").status_code == 404
    for name, body in (
        ("-bad", {"model": base}),
        (base.strip("/").replace("/", "_") + "x" * 64, {"model": base}),
        ("ok", {"model": base, "extra": 1}),
        ("ok", {}),
    ):
        assert _api(url, KEY, "PUT", f"/aliases/{name}", json=body).status_code == 400, (name, body)
    assert _api(url, KEY, "PUT", "/aliases/ok", json={"model": "no-such-model"}).status_code == 404
    assert httpx.put(f"{url}/v1/aliases/ok", json={"model": base}, timeout=30).status_code == 401


def _cli(url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nightlab.cli", "alias", *args, "--url", url, "--api-key", KEY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_the_alias_commands_move_and_roll_back_through_the_service(served):
    url, base, (first, _) = served
    assert _cli(url, "set", "cli-alias", base).returncode == 0
    moved = _cli(url, "set", "cli-alias", first, "--reason", "promoted by hand")
    assert moved.stdout.strip() == f"cli-alias -> {first}  (set: promoted by hand)"
    back = _cli(url, "rollback", "cli-alias", "--reason", "worse on the rubric")
    why = f"rollback from {first}: worse on the rubric"
    assert back.stdout.strip() == f"cli-alias -> {base}  (rollback: {why})"
    assert f"cli-alias -> {base}" in _cli(url, "list").stdout
    assert len(_cli(url, "history", "cli-alias").stdout.strip().splitlines()) == 3
    again = _cli(url, "rollback", "cli-alias")
    assert again.returncode == 1 and "409" in again.stderr and "no earlier target" in again.stderr
    nobody = _cli("http://127.0.0.1:9", "list")
    assert nobody.returncode == 1 and "no training service answers" in nobody.stderr
