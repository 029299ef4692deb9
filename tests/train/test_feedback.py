"""Feedback on /v1 answers over real HTTP: answers carry an id, ratings on them are stored durably with the
prompt and the answer, once per answer, only by the key that got it, and export as a dataset."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from nightlab.train.api.app import create_app
from nightlab.train.api.background import serve_in_thread
from nightlab.train.engine import Engine
from nightlab.train.feedback import FeedbackStore
from nightlab.train.settings import ServeSettings

KEY, OTHER = "tml-feedback-a", "tml-feedback-b"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    return Engine(tmp_path_factory.mktemp("engine"), device="cpu", precision="fp32", show_progress=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def server(tiny_model_dir, data_dir, engine):
    settings = ServeSettings(
        data_dir=data_dir, device="cpu", api_keys=[KEY, OTHER], allowed_models=[str(tiny_model_dir)]
    )
    with serve_in_thread(create_app(settings, engine)) as srv:
        yield srv.url, str(tiny_model_dir.resolve())


def _rate(url: str, key: str | None, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/feedback", json=body, headers=headers, timeout=60)


def test_a_rating_is_stored_with_its_prompt_and_answer_once_per_answer(server, data_dir, tmp_path):
    url, model = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "what is 2 + 3?"}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    answer = out.choices[0].message.content
    assert out.id.startswith("chatcmpl-")

    first = _rate(url, KEY, {"id": out.id, "rating": 1})
    assert first.status_code == 200 and first.json()["status"] == "recorded"
    again = _rate(url, KEY, {"id": out.id, "rating": -1, "correction": "5", "comment": "just the number"})
    assert again.json()["status"] == "replaced"  # the same answer rated again replaces, never adds

    exported = tmp_path / "feedback.jsonl"
    cli = [
        sys.executable,
        "-m",
        "nightlab.cli",
        "feedback",
        "export",
        str(exported),
        "--data-dir",
        str(data_dir),
    ]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    mine = [r for r in rows if r["id"] == out.id]
    assert len(mine) == 1
    assert mine[0]["prompt"] == messages and mine[0]["answer"] == answer and mine[0]["model"] == model
    assert (mine[0]["rating"], mine[0]["correction"], mine[0]["comment"]) == (-1, "5", "just the number")
    listed = httpx.get(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    assert [r["id"] for r in listed["data"]] == [r["id"] for r in rows]  # the API lists the key's own
    later = httpx.get(
        f"{url}/v1/feedback", params={"since": mine[0]["updated_at"]}, headers={"X-API-Key": KEY}, timeout=60
    )
    assert out.id not in [r["id"] for r in later.json()["data"]]
    other = httpx.get(f"{url}/v1/feedback", headers={"X-API-Key": OTHER}, timeout=60).json()["data"]
    assert other == []
    pairs = [json.loads(line) for line in (tmp_path / "feedback.pairs.jsonl").read_text().splitlines()]
    assert {"prompt": messages, "chosen": "5", "rejected": answer}.items() <= pairs[0].items()


def test_streamed_and_multi_choice_answers_can_be_rated_by_choice(server, data_dir):
    url, model = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    stream = client.completions.create(
        model=model, prompt=["the answer is", "hi"], max_tokens=4, n=2, seed=3, stream=True
    )
    texts: dict[int, str] = {}
    ident = ""
    for chunk in stream:
        ident = chunk.id
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.text or "")
    assert sorted(texts) == [0, 1, 2, 3]
    assert _rate(url, KEY, {"id": ident, "choice": 3, "rating": 0.25}).json()["status"] == "recorded"
    missing = _rate(url, KEY, {"id": ident, "choice": 9, "rating": 1})
    assert missing.status_code == 404 and "choice 9" in missing.json()["error"]["message"]
    store = FeedbackStore(data_dir)  # what a restarted server reads: committed before the answer was sent
    try:
        [row] = [r for r in store.rows() if r["id"] == ident]
    finally:
        store.close()
    assert (row["choice"], row["prompt"], row["answer"], row["rating"]) == (3, "hi", texts[3], 0.25)


def test_only_the_key_that_got_an_answer_may_rate_it_and_nonsense_is_refused(server):
    url, model = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    out = client.completions.create(model=model, prompt="hello", max_tokens=3)
    assert _rate(url, None, {"id": out.id, "rating": 1}).status_code == 401
    assert _rate(url, OTHER, {"id": out.id, "rating": 1}).status_code == 404
    for bad in (
        {"id": out.id, "rating": "NaN"},
        {"id": out.id, "rating": 1, "extra": True},
        {"id": "chatcmpl-not-an-id", "rating": 1},
        {"id": out.id},
        {"id": out.id, "rating": 1, "choice": -1},
    ):
        refused = _rate(url, KEY, bad)
        assert refused.status_code == 400, bad
        assert refused.json()["error"]["type"] == "invalid_request_error"
