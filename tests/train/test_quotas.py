"""Per-key quotas over real HTTP: counts past a limit get a 429, stored text and metadata past a cap a 400,
each naming the setting and its value; other keys are not affected, and freeing something makes room again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nightlab.train.engine import Engine
from tests.train.test_tinker_api import ALICE, BOB, Server, eventually, post, start_server, wait_future

LIMITS = {
    "max_active_sessions_per_key": 2,
    "max_training_clients_per_key": 1,
    "max_checkpoints_per_key": 2,
    "max_display_name_chars": 16,
    "max_metadata_bytes": 64,
}
BIG = {"notes": "x" * 100}
BIG_SAYS = f"user_metadata is {len(json.dumps(BIG))} bytes"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(tmp_path_factory.mktemp("engine"), device="cpu", precision="fp32", show_progress=False)


@pytest.fixture
def server(tmp_path: Path, tiny_model_dir: Path, engine: Engine) -> Iterator[Server]:
    srv = start_server(tmp_path, str(tiny_model_dir), engine, **LIMITS)
    yield srv
    srv.stop()


def new_session(server: Server, key: str = ALICE, **body) -> httpx.Response:
    return post(server, "create_session", key=key, json={"tags": [], **body})


def new_model(
    server: Server, session_id: str, seq: int, base: Path, key: str = ALICE, **body
) -> httpx.Response:
    request = {
        "session_id": session_id,
        "model_seq_id": seq,
        "base_model": str(base),
        "lora_config": {"rank": 4},
    }
    return post(server, "create_model", key=key, json={**request, **body})


def refused(answer: httpx.Response, status: int, *says: str) -> bool:
    return answer.status_code == status and all(s in answer.json()["error"] for s in says)


def sessions_of(server: Server, key: str = ALICE) -> list[str]:
    return httpx.get(f"{server.url}/api/v1/sessions", headers={"X-API-Key": key}, timeout=30).json()[
        "sessions"
    ]


def test_a_huge_display_name_or_metadata_is_refused_and_not_stored(server: Server) -> None:
    huge = new_session(server, display_name="n" * 100_000)
    assert refused(huge, 400, "display_name is 100000 characters", "16 allowed (max_display_name_chars)")
    for field, value in [("user_metadata", BIG), ("tags", ["t" * 100]), ("sdk_version", "v" * 100)]:
        answer = new_session(server, **{field: value})
        assert refused(answer, 400, f"{field} is ", "64 allowed (max_metadata_bytes)"), answer.text
    assert sessions_of(server) == []
    ok = new_session(server, display_name="n" * 16, user_metadata={"a": "b"})
    assert ok.status_code == 200 and sessions_of(server) == [ok.json()["session_id"]]
    finish = post(server, f"sessions/{ok.json()['session_id']}/finish", json={"detail": "d" * 100})
    assert refused(finish, 400, "detail is 100 characters", "max_metadata_bytes")


def test_active_sessions_per_key_are_limited_and_finishing_one_makes_room(server: Server) -> None:
    first, second = (new_session(server).json()["session_id"] for _ in range(2))
    third = new_session(server)
    assert refused(third, 429, "already holds 2 active sessions", "max_active_sessions_per_key=2")
    assert new_session(server, key=BOB).status_code == 200  # another key has its own quota
    post(server, f"sessions/{first}/finish", json={})
    assert new_session(server).status_code == 200
    assert set(sessions_of(server)) >= {first, second}


def test_training_clients_per_key_are_limited_until_their_session_ends(
    server: Server, tiny_model_dir: Path
) -> None:
    session = new_session(server).json()["session_id"]
    wait_future(server, new_model(server, session, 0, tiny_model_dir).json()["request_id"])
    second = new_model(server, session, 1, tiny_model_dir)
    assert refused(second, 429, "already holds 1 training clients", "max_training_clients_per_key=1")
    bob = new_session(server, key=BOB).json()["session_id"]
    assert new_model(server, bob, 0, tiny_model_dir, key=BOB).status_code == 200
    post(server, f"sessions/{session}/finish", json={})
    other = new_session(server).json()["session_id"]
    eventually(lambda: new_model(server, other, 0, tiny_model_dir).status_code == 200)


def test_checkpoints_per_key_are_limited_but_replacing_one_is_not(
    server: Server, tiny_model_dir: Path
) -> None:
    session = new_session(server).json()["session_id"]
    model_id = wait_future(server, new_model(server, session, 0, tiny_model_dir).json()["request_id"]).json()[
        "model_id"
    ]

    def save(seq: int, name: str, **body) -> httpx.Response:
        return post(server, "save_weights", json={"model_id": model_id, "seq_id": seq, "path": name, **body})

    for seq, name in [(1, "a"), (2, "b")]:
        assert "path" in wait_future(server, save(seq, name).json()["request_id"]).json()
    assert refused(save(3, "c"), 429, "already holds 2 checkpoints", "max_checkpoints_per_key=2")
    replaced = save(4, "b", overwrite=True)  # the refused save still took seq_id 3: this one runs at once
    assert "path" in wait_future(server, replaced.json()["request_id"]).json()
    assert refused(save(5, "d", user_metadata=BIG), 400, BIG_SAYS, "max_metadata_bytes")
    httpx.delete(
        f"{server.url}/api/v1/training_runs/{model_id}/checkpoints/weights/a", headers={"X-API-Key": ALICE}
    )
    assert "path" in wait_future(server, save(6, "c").json()["request_id"]).json()


def test_training_client_metadata_is_capped(server: Server, tiny_model_dir: Path) -> None:
    session = new_session(server).json()["session_id"]
    answer = new_model(server, session, 0, tiny_model_dir, user_metadata=BIG)
    assert refused(answer, 400, BIG_SAYS, "64 allowed (max_metadata_bytes)")
    assert new_model(server, session, 0, tiny_model_dir).status_code == 200  # nothing was held for it
