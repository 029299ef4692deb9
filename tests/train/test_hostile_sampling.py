"""A hostile sampling request fails alone: neither a refused parameter nor a crash inside a shared batch
reaches the other tenants' requests batched with it (real HTTP against a real server)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from nightlab.train.futures import BatchQueue
from tests.train.test_tinker_api import ALICE, BOB, Server, post, start_server, wait_future

WINDOW_S = 1.0  # long enough that requests sent one after another land in one batch
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("serve"), str(tiny_model_dir), sample_batch_window_s=WINDOW_S)
    yield srv
    srv.stop()


def sample_body(base: str, **extra) -> dict:
    return {
        "base_model": base,
        "prompt": {"chunks": [{"tokens": PROMPT}]},
        "sampling_params": {"max_tokens": 3, "seed": 1, "stop": []},
        **extra,
    }


def test_a_topk_beyond_the_vocabulary_is_refused_and_spares_its_batch(server, tiny_model_dir: Path) -> None:
    base = str(tiny_model_dir)
    vocab = len(server.engine.tokenizer(base))  # the tiny model embeds exactly its tokenizer's ids
    good = post(server, "asample", key=ALICE, json=sample_body(base, topk_sample_logprobs=2))
    bad = post(server, "asample", key=BOB, json=sample_body(base, topk_sample_logprobs=100_000))
    assert bad.status_code == 400, bad.text
    assert "topk_sample_logprobs" in bad.json()["error"] and str(vocab) in bad.json()["error"]
    assert bad.json()["category"] == "user"
    done = wait_future(server, good.json()["request_id"])
    assert done.headers["content-type"] == "application/x-protobuf", done.text
    prompt_topk = post(server, "asample", key=BOB, json=sample_body(base, topk_prompt_logprobs=vocab + 1))
    assert prompt_topk.status_code == 400 and "topk_prompt_logprobs" in prompt_topk.json()["error"]


def test_a_request_that_crashes_its_batch_is_retried_alone(
    server, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure no check foresaw (planted here: seed 666 crashes its batch) fails only its own request."""
    base = str(tiny_model_dir)
    real_sample = server.engine.sample
    batches: list[int] = []

    def crashing_sample(base_model, adapter_dir, requests):
        batches.append(len(requests))
        if any(r.params.seed == 666 for r in requests):
            raise RuntimeError("selected index k out of range")
        return real_sample(base_model, adapter_dir, requests)

    monkeypatch.setattr(server.engine, "sample", crashing_sample)
    good = post(server, "asample", key=ALICE, json=sample_body(base))
    poison = sample_body(base)
    poison["sampling_params"]["seed"] = 666
    bad = post(server, "asample", key=BOB, json=poison)
    assert good.status_code == bad.status_code == 200
    done = wait_future(server, good.json()["request_id"])
    assert done.headers["content-type"] == "application/x-protobuf", done.text
    failed = wait_future(server, bad.json()["request_id"], key=BOB).json()
    assert failed["category"] == "server" and "out of range" in failed["error"]
    assert batches[0] == 2, "both requests must have shared one batch for this test to mean anything"


def test_batch_queue_isolates_any_failure_to_its_item() -> None:
    def run_batch(key: str, items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return [item * 2 for item in items]

    async def main() -> list[int | BaseException]:
        queue: BatchQueue[str, int, int] = BatchQueue(run_batch, window_s=0.05, max_batch=8)
        return await asyncio.gather(*(queue.submit("k", i) for i in (1, 13, 2)), return_exceptions=True)

    first, failed, last = asyncio.run(main())
    assert (first, last) == (2, 4)
    assert isinstance(failed, ValueError)
