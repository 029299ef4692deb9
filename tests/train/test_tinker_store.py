"""The service's bookkeeping without a model: request order and idempotency, checkpoints on disk, API keys."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nightlab.train import futures as futures_module
from nightlab.train.checkpoints import CheckpointStore, parse_path
from nightlab.train.errors import EngineError, UserError
from nightlab.train.futures import BatchQueue, FutureStore, OrderedQueue, Payload
from nightlab.train.sessions import LOCAL_OWNER, SessionStore
from nightlab.train.settings import ServeSettings


def _recorder(log: list[int], seq: int):
    async def work() -> Payload:
        log.append(seq)
        return Payload({"seq": seq})

    return work


def test_ordered_queue_runs_in_seq_order_once_each() -> None:
    async def scenario() -> None:
        futures, log = FutureStore(), []
        queue = OrderedQueue("m", futures, next_seq=1, gap_timeout_s=5)
        # chunks of one call may arrive out of order (the SDK sends the first one last)
        ids = {seq: queue.submit("o", seq, "op", _recorder(log, seq), chunk=True) for seq in (3, 2)}
        await asyncio.sleep(0.05)
        assert log == []  # 1 has not arrived: nothing may run
        ids[1] = queue.submit("o", 1, "op", _recorder(log, 1), chunk=True)
        assert (
            queue.submit("o", 2, "op", _recorder(log, 99), chunk=True) == ids[2]
        )  # a retry gets the first back
        with pytest.raises(UserError, match="already used by a op request"):
            queue.submit("o", 2, "other", _recorder(log, 99))
        for seq in (1, 2, 3):
            future = futures.get(ids[seq], "o")
            assert await futures.wait(future, 5)
            assert future.payload.body == {"seq": seq}
        assert log == [1, 2, 3]
        with pytest.raises(UserError, match="already ran"):
            queue.submit("o", 0, "op", _recorder(log, 0))
        assert queue.submit("o", None, "op", _recorder(log, 4)) != ids[3]  # no seq_id: goes last
        await queue.close(1)

    asyncio.run(scenario())


def test_ordered_queue_fails_clearly_when_a_seq_id_never_arrives() -> None:
    async def scenario() -> None:
        futures, log = FutureStore(), []
        queue = OrderedQueue("model-x", futures, next_seq=1, gap_timeout_s=0.2)
        waiting = queue.submit("o", 3, "op", _recorder(log, 3), chunk=True)
        future = futures.get(waiting, "o")
        assert await futures.wait(future, 5)
        message, category = future.error
        assert category == "User" and "seq_id 1 of model-x never arrived" in message
        later = queue.submit("o", 4, "op", _recorder(log, 4))  # the queue moved past the gap
        assert await futures.wait(futures.get(later, "o"), 5) and log == [4]
        await queue.close(1)

    asyncio.run(scenario())


def test_ordered_queue_refuses_a_skipped_seq_id_and_a_changed_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(futures_module, "SEEN_KEPT", 2)

    async def scenario() -> None:
        futures, log = FutureStore(), []
        queue = OrderedQueue("model-y", futures, next_seq=1, gap_timeout_s=5)
        waiting = queue.submit("o", 2, "fb", _recorder(log, 2), chunk=True)  # a chunk may wait for seq_id 1
        with pytest.raises(UserError, match="seq_id 3 of model-y arrived before seq_id 1") as exc:
            queue.submit("o", 3, "optim_step", _recorder(log, 3))  # nothing else may: refused at once
        assert exc.value.status == 400 and "continues from seq_id 4" in str(exc.value)
        assert futures.get(waiting, "o").error == (str(exc.value), "User")  # the chunk waiting on 1 fails too
        first = queue.submit(
            "o", 4, "fb", _recorder(log, 4), chunk=True, fingerprint="a"
        )  # and the model goes on
        assert queue.submit("o", 4, "fb", _recorder(log, 4), chunk=True, fingerprint="a") == first
        with pytest.raises(UserError, match="already used by a different fb request"):
            queue.submit("o", 4, "fb", _recorder(log, 4), chunk=True, fingerprint="b")
        for seq in range(5, 10):  # the retry memory stays bounded: old seq_ids are forgotten
            await futures.wait(futures.get(queue.submit("o", seq, "op", _recorder(log, seq)), "o"), 5)
        with pytest.raises(UserError, match="already ran"):
            queue.submit("o", 4, "fb", _recorder(log, 4), chunk=True, fingerprint="a")
        assert log == list(range(4, 10))
        await queue.close(1)

    asyncio.run(scenario())


def test_ordered_queue_close_lets_queued_work_finish_within_the_grace() -> None:
    async def scenario() -> None:
        futures, log = FutureStore(), []

        def slow(seq: int):
            async def work() -> Payload:
                await asyncio.sleep(0.05)
                log.append(seq)
                return Payload({"seq": seq})

            return work

        queue = OrderedQueue("m", futures, next_seq=1)
        ids = [queue.submit("o", seq, "op", slow(seq)) for seq in (1, 2, 3)]
        await queue.close(grace_s=5)
        assert log == [1, 2, 3] and all(futures.get(i, "o").payload for i in ids)
        with pytest.raises(UserError) as exc:
            queue.submit("o", 4, "op", slow(4))
        assert exc.value.status == 410

        hurried = OrderedQueue("m", futures, next_seq=1)
        ids = [hurried.submit("o", seq, "op", slow(seq)) for seq in (1, 2)]
        await hurried.close(grace_s=0.01)
        assert [futures.get(i, "o").error[1] for i in ids] == ["Server", "Server"]  # cut off, and told so

    asyncio.run(scenario())


def test_future_store_forgets_results_soon_after_they_are_fetched() -> None:
    async def scenario() -> None:
        futures = FutureStore(ttl_s=3600, fetched_keep_s=0)
        fetched, unfetched = (futures.start("o", _recorder([], i)) for i in (1, 2))
        for rid in (fetched, unfetched):
            assert await futures.wait(futures.get(rid, "o"), 5)
        futures.fetched(futures.get(fetched, "o"))
        await asyncio.sleep(0.01)
        futures.prune()
        with pytest.raises(UserError, match="unknown request_id") as exc:
            futures.get(fetched, "o")
        assert exc.value.status == 404
        assert futures.get(unfetched, "o").payload.body == {"seq": 2}  # kept until fetched or the TTL

    asyncio.run(scenario())


def test_future_failures_carry_a_category_and_owners_are_kept_apart() -> None:
    async def scenario() -> None:
        futures = FutureStore()

        async def bad() -> Payload:
            raise UserError("no such loss 'foo'")

        async def broken() -> Payload:
            raise RuntimeError("disk on fire")

        user, server = futures.start("alice", bad), futures.start("alice", broken)
        for rid, category in ((user, "User"), (server, "Server")):
            future = futures.get(rid, "alice")
            assert await futures.wait(future, 5)
            assert future.error[1] == category
        with pytest.raises(UserError) as exc:
            futures.get(user, "bob")
        assert exc.value.status == 403
        with pytest.raises(UserError) as exc:
            futures.get("req-nope", "alice")
        assert exc.value.status == 404

    asyncio.run(scenario())


def test_batch_queue_gathers_concurrent_items_per_key() -> None:
    calls: list[tuple[str, list[int]]] = []

    def run_batch(key: str, items: list[int]) -> list[int]:
        calls.append((key, items))
        return [i * 10 for i in items]

    async def scenario() -> list[int]:
        queue = BatchQueue(run_batch, window_s=0.05, max_batch=3)
        return await asyncio.gather(*(queue.submit("a", i) for i in range(5)), queue.submit("b", 7))

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40, 70]
    assert ("a", [0, 1, 2]) in calls and ("a", [3, 4]) in calls and ("b", [7]) in calls


def test_batch_queue_fails_only_the_bad_item_when_a_batch_is_refused() -> None:
    calls: list[list[int]] = []

    def run_batch(key: str, items: list[int]) -> list[int]:
        calls.append(items)
        if any(i < 0 for i in items):  # validation refuses the whole call before any work, like Engine.sample
            raise EngineError(f"item {min(items)} is negative")
        return [i * 10 for i in items]

    async def scenario() -> list[int | BaseException]:
        queue = BatchQueue(run_batch, window_s=0.05, max_batch=8)
        return await asyncio.gather(*(queue.submit("k", i) for i in (1, -1, 2)), return_exceptions=True)

    good_a, bad, good_b = asyncio.run(scenario())
    assert (good_a, good_b) == (10, 20) and isinstance(bad, EngineError) and "-1 is negative" in str(bad)
    assert calls[0] == [1, -1, 2]  # one batch first, then each item alone


def test_batch_queue_fails_the_whole_batch_on_a_server_error() -> None:
    def run_batch(key: str, items: list[int]) -> list[int]:
        raise EngineError("out of memory", "Server")

    async def scenario() -> list[int | BaseException]:
        queue = BatchQueue(run_batch, window_s=0.05, max_batch=8)
        return await asyncio.gather(*(queue.submit("k", i) for i in (1, 2)), return_exceptions=True)

    assert all(isinstance(r, EngineError) and r.category == "Server" for r in asyncio.run(scenario()))


def _write(text: str):
    def write(directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "adapter.txt").write_text(text)

    return write


def test_checkpoints_are_atomic_owned_and_survive_a_restart(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.add_run("s1:train:0", "alice", "s1", "base", {"rank": 4}, None)
    ckpt = store.save("s1:train:0", "alice", "training", "first", _write("v1"))
    assert ckpt.tinker_path == "tinker://s1:train:0/weights/first"
    with pytest.raises(UserError, match="exists; pass overwrite=True"):
        store.save("s1:train:0", "alice", "training", "first", _write("v2"))
    replaced = store.save("s1:train:0", "alice", "training", "first", _write("v2"), overwrite=True)
    assert replaced.directory != ckpt.directory and not ckpt.directory.exists()

    def crash(directory: Path) -> None:
        _write("partial")(directory)
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.save("s1:train:0", "alice", "sampler", "half", crash)
    assert [c.checkpoint_id for c in store.checkpoints("s1:train:0", "alice")] == ["weights/first"]
    with pytest.raises(UserError) as exc:
        store.resolve(ckpt.tinker_path, "bob")
    assert exc.value.status == 403
    with pytest.raises(UserError, match="invalid checkpoint name"):
        store.save("s1:train:0", "alice", "training", "../escape", _write("x"))
    store.close()

    (tmp_path / "checkpoints" / "s1_train_0" / "weights" / ".tmp-stray.abc").mkdir()  # a killed save
    again = CheckpointStore(tmp_path)
    run, found = again.resolve("tinker://s1:train:0/weights/first", "alice")
    assert run.base_model == "base" and (found.directory / "adapter.txt").read_text() == "v2"
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "s1_train_0" / "weights").iterdir()) == [
        found.directory.name
    ]
    again.delete("s1:train:0", "weights/first", "alice")
    assert again.checkpoints("s1:train:0", "alice") == [] and not found.directory.exists()
    again.close()


def test_inflight_weights_are_one_link_switched_to_each_new_version(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    link = store.publish_inflight("s1:train:0", _write("v1"))
    first = link.resolve()
    assert (
        store.publish_inflight("s1:train:0", _write("v2")) == link
        and (link / "adapter.txt").read_text() == "v2"
    )
    assert first.is_dir()  # kept for a sampler that resolved the link just before the switch
    store.publish_inflight("s1:train:0", _write("v3"))
    assert not first.exists() and (link / "adapter.txt").read_text() == "v3"
    store.drop_ephemeral("s1:train:0")
    assert not store.ephemeral_dir("s1:train:0").exists()
    store.close()


@pytest.mark.parametrize(
    "path",
    ["tinker://run/weights", "s3://run/weights/x", "tinker://run/other/x", "tinker://run/weights/../x"],
)
def test_bad_tinker_paths_say_what_a_good_one_looks_like(path: str) -> None:
    with pytest.raises(UserError, match="expected tinker://<training_run_id>/weights/<name>"):
        parse_path(path)


def test_checkpoint_count_leaves_out_the_one_a_save_would_replace(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.add_run("s1:train:0", "alice", "s1", "base", {"rank": 4}, None)
    store.add_run("s2:train:0", "bob", "s2", "base", {"rank": 4}, None)
    for name in ("a", "b"):
        store.save("s1:train:0", "alice", "training", name, _write(name))
    store.save("s2:train:0", "bob", "sampler", "a", _write("bob"))
    assert store.count("alice") == 2 and store.count("bob") == 1
    assert store.count("alice", besides=("s1:train:0", "training", "a")) == 1
    assert store.count("alice", besides=("s1:train:0", "sampler", "a")) == 2  # another kind: a new one
    store.close()


def test_a_checkpoint_whose_directory_vanished_is_refused_by_name(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.add_run("s1:train:0", "alice", "s1", "base", {"rank": 4}, None)
    ckpt = store.save("s1:train:0", "alice", "training", "first", _write("v1"))
    (ckpt.directory / "adapter.txt").unlink()
    with pytest.raises(UserError, match="its files in .* hold 0 bytes, not the 2") as exc:
        store.resolve(ckpt.tinker_path, "alice")
    assert exc.value.status == 410
    assert [c.to_json()["files_missing"] for c in store.checkpoints("s1:train:0", "alice")] == [True]
    store.save("s1:train:0", "alice", "training", "first", _write("v2"), overwrite=True)  # repaired
    assert store.resolve(ckpt.tinker_path, "alice")[1].missing is None
    store.close()


@pytest.mark.parametrize(
    ("limit", "offset", "says"),
    [(0, 0, "limit must be between 1 and 10000, got 0"), (20, -1, "offset must be between 0 and 2147483647")],
)
def test_listings_refuse_pages_the_database_cannot_express(
    tmp_path: Path, limit: int, offset: int, says: str
) -> None:
    sessions, store = SessionStore(tmp_path, []), CheckpointStore(tmp_path)
    for listing in (sessions.list, store.runs, store.user_checkpoints):
        with pytest.raises(UserError, match=says):
            listing(LOCAL_OWNER, limit, offset)
    sessions.close()
    store.close()


def test_session_store_caps_what_a_key_holds_and_stores(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, [], max_active=1, max_display_name_chars=4, max_metadata_bytes=16)
    with pytest.raises(UserError, match="display_name is 5 characters, more than the 4 allowed"):
        store.create(LOCAL_OWNER, [], None, "named", None)
    with pytest.raises(
        UserError, match=r"user_metadata is 19 bytes, more than the 16 allowed \(max_metadata"
    ):
        store.create(LOCAL_OWNER, [], {"k": "0123456789"}, None, None)
    first = store.create(LOCAL_OWNER, ["t"], {"k": "v"}, "name", "0.1")
    with pytest.raises(UserError, match="already holds 1 active sessions") as exc:
        store.create(LOCAL_OWNER, [], None, None, None)
    assert exc.value.status == 429
    store.finish(first.session_id, LOCAL_OWNER, None, None)
    store.create(LOCAL_OWNER, [], None, None, None)
    store.close()


def test_api_keys_name_owners_and_sessions_finish(tmp_path: Path) -> None:
    keyed = SessionStore(tmp_path, ["tml-alice", "tml-bob"])
    alice, bob = keyed.authenticate("tml-alice"), keyed.authenticate("tml-bob")
    assert alice != bob and "tml-alice" not in alice
    for key, hint in (
        (None, "missing X-API-Key"),
        ("tml-eve", "unknown API key"),
        ("sk-x", "start with 'tml-'"),
    ):
        with pytest.raises(UserError, match=hint) as exc:
            keyed.authenticate(key)
        assert exc.value.status == 401
    session = keyed.create(alice, ["t"], {"k": "v"}, "demo", "0.38.0")
    with pytest.raises(UserError) as exc:
        keyed.get(session.session_id, bob)
    assert exc.value.status == 403
    keyed.heartbeat(session.session_id, alice)
    keyed.finish(session.session_id, alice, {"type": "success"}, None)
    with pytest.raises(UserError) as exc:
        keyed.heartbeat(session.session_id, alice)
    assert exc.value.status == 410
    assert keyed.list(alice) == ([session.session_id], 1) and keyed.list(bob) == ([], 0)
    silent = keyed.create(bob, [], None, None, None)
    assert keyed.expire(idle_s=3600) == []
    assert keyed.expire(idle_s=0) == [silent.session_id]  # the finished session is not expired again
    assert keyed.get(silent.session_id, bob).status["type"] == "cancelled"
    keyed.close()
    open_store = SessionStore(tmp_path, [])
    assert open_store.authenticate(None) == open_store.authenticate("tml-anything") == LOCAL_OWNER
    open_store.close()


def test_settings_refuse_public_host_without_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without API keys"):
        ServeSettings(data_dir=tmp_path, host="0.0.0.0").check_exposure()
    ServeSettings(data_dir=tmp_path, host="0.0.0.0", api_keys=["tml-k"]).check_exposure()
    with pytest.raises(ValueError, match="must start with 'tml-'"):
        ServeSettings(data_dir=tmp_path, api_keys=["secret"])


def test_serve_command_refuses_a_public_host_without_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from nightlab.cli import app

    monkeypatch.delenv("NIGHTLAB_API_KEYS", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "without API keys" in result.output
