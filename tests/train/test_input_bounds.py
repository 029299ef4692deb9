"""Inputs past what the model, the optimizer or the database take are refused with a 400 that names the
bound, before anything runs or is written (real HTTP; raw requests where the tinker SDK would not send them).
A refused training request still takes its seq_id, so the client's next request runs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from nightlab.train.checkpoints import MAX_PAGE_LIMIT, MAX_TTL_S
from tests.train.test_tinker_api import ALICE, Server, post

CONTEXT = 512  # the tiny model's max_position_embeddings (and vocabulary size)


@pytest.fixture(scope="module")
def client(server: Server, tiny_model_dir: Path) -> Iterator[tinker.TrainingClient]:
    service = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    yield service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0).result()
    service.close("success").result()


def datum(length: int) -> types.Datum:
    tokens = [(7 * i) % CONTEXT for i in range(length + 1)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
    )


def raw_post(server: Server, route: str, body: dict) -> httpx.Response:
    """JSON as Python writes it, NaN and Infinity included (httpx's json= would do the same)."""
    headers = {"X-API-Key": ALICE, "Content-Type": "application/json"}
    return httpx.post(f"{server.url}/api/v1/{route}", content=json.dumps(body), headers=headers, timeout=30)


def checkpoint_dirs(server: Server) -> set[str]:
    root = server.data_dir / "checkpoints"
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.is_dir() else set()


def test_a_datum_longer_than_the_context_is_refused_naming_both_lengths(client) -> None:
    before = client.forward([datum(8)], "cross_entropy").result().metrics["loss:sum"]
    with pytest.raises(tinker.BadRequestError) as exc:
        client.forward_backward([datum(8), datum(CONTEXT + 1)], "cross_entropy").result()
    assert f"datum 1 has {CONTEXT + 1} tokens" in str(exc.value) and f"({CONTEXT} tokens)" in str(exc.value)
    client.forward_backward([datum(CONTEXT)], "cross_entropy").result()  # a full context is fine
    client.optim_step(types.AdamParams(learning_rate=0.0)).result()
    assert client.forward([datum(8)], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(before)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("learning_rate", math.nan, "learning_rate must be a finite number, got nan"),
        ("learning_rate", math.inf, "learning_rate must be a finite number, got inf"),
        ("eps", -math.inf, "eps must be a finite number, got -inf"),
        ("beta1", 1.0, "beta1 must be in [0, 1), got 1.0"),
        ("weight_decay", -0.1, "must be >= 0"),
    ],
)
def test_non_finite_or_out_of_range_adam_parameters_are_refused(
    server: Server, client, field: str, value: float, says: str
) -> None:
    before = client.forward([datum(8)], "cross_entropy").result().metrics["loss:sum"]
    client.forward_backward([datum(8)], "cross_entropy").result()
    body = {"model_id": client.model_id, "adam_params": {field: value}}  # refused before it is queued
    refused = raw_post(server, "optim_step", body)
    assert refused.status_code == 400 and says in refused.json()["error"]
    # the SDK sends NaN and infinity as null, which must not fall back to the default learning rate
    with pytest.raises(tinker.BadRequestError, match="null Adam parameters .*: learning_rate;"):
        client.optim_step(types.AdamParams(learning_rate=math.nan)).result()
    client.optim_step(types.AdamParams(learning_rate=0.0)).result()  # the gradients stay unused
    after = client.forward([datum(8)], "cross_entropy").result().metrics["loss:sum"]
    assert math.isfinite(after) and after == pytest.approx(before)


@pytest.mark.parametrize("route", ["sessions", "training_runs", "checkpoints"])
@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("limit=99999999999999999999", f"limit must be between 1 and {MAX_PAGE_LIMIT}"),
        ("limit=-1", f"limit must be between 1 and {MAX_PAGE_LIMIT}"),
        ("offset=99999999999999999999", "offset must be between 0 and 2147483647"),
        ("offset=-5", "offset must be between 0 and"),
    ],
)
def test_listing_pages_out_of_range_are_refused(server: Server, route: str, query: str, says: str) -> None:
    answer = httpx.get(f"{server.url}/api/v1/{route}?{query}", headers={"X-API-Key": ALICE}, timeout=30)
    assert answer.status_code == 400 and says in answer.json()["error"]


def test_a_lora_seed_beyond_64_bits_is_refused(server: Server, tiny_model_dir: Path) -> None:
    session = post(server, "create_session", json={"tags": []}).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": str(tiny_model_dir)}
    refused = post(server, "create_model", json={**body, "lora_config": {"rank": 4, "seed": 2**70}})
    assert refused.status_code == 400 and f"got {2**70}" in refused.json()["error"]
    assert (
        "LoRA seed must be between -9223372036854775808 and 18446744073709551615" in refused.json()["error"]
    )


@pytest.mark.parametrize("ttl", [MAX_TTL_S + 1, 10**30, 10**400])
def test_a_ttl_past_ten_years_is_refused_before_anything_is_written(server: Server, client, ttl: int) -> None:
    before = checkpoint_dirs(server)
    refused = raw_post(
        server, "save_weights", {"model_id": client.model_id, "path": "kept", "ttl_seconds": ttl}
    )
    assert (
        refused.status_code == 400
        and f"ttl_seconds must be between 1 and {MAX_TTL_S}" in refused.json()["error"]
    )
    assert checkpoint_dirs(server) == before
    assert httpx.get(f"{server.url}/api/v1/checkpoints", headers={"X-API-Key": ALICE}).status_code == 200


@pytest.mark.parametrize("name", ["ends-in-newline\n", "a/b", "..", "bell\x07", "tab\there", "-x", "x" * 129])
def test_checkpoint_names_outside_the_safe_alphabet_are_refused(server: Server, client, name: str) -> None:
    before = checkpoint_dirs(server)
    refused = raw_post(server, "save_weights", {"model_id": client.model_id, "path": name})
    assert refused.status_code == 400 and "invalid checkpoint name" in refused.json()["error"]
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint name"):
        client.save_state(name).result()
    assert checkpoint_dirs(server) == before
