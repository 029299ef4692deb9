"""Checkpoints survive power loss and say so when they did not: their files and directories reach the disk
around the rename that publishes them, and a restarted server names every checkpoint whose files are gone."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import httpx
import pytest
import tinker

from nightlab.train.checkpoints import CheckpointStore
from tests.train.test_tinker_api import ALICE, start_server


def test_a_save_flushes_its_files_and_directories_around_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def write(directory: Path) -> None:
        (directory / "nested").mkdir(parents=True)
        (directory / "adapter.bin").write_bytes(b"w" * 100)
        (directory / "nested" / "optimizer.pt").write_bytes(b"o" * 10)

    store = CheckpointStore(tmp_path)
    store.add_run("s1:train:0", "alice", "s1", "base", {"rank": 4}, None)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt = store.save("s1:train:0", "alice", "training", "first", write)
    monkeypatch.undo()
    staged = ckpt.directory.with_name(".tmp-" + ckpt.directory.name)  # its name until the rename
    written = {staged / "adapter.bin", staged / "nested" / "optimizer.pt", staged / "nested", staged}
    assert written <= set(synced)
    last_staged = max(i for i, path in enumerate(synced) if path in written)
    after = synced[last_staged + 1 :]  # the rename happened here: its directory, and the new ones above it
    assert after == [ckpt.directory.parent, ckpt.directory.parent.parent, tmp_path / "checkpoints"]
    assert synced.index(staged / "nested" / "optimizer.pt") < synced.index(staged / "nested")
    store.close()


def checkpoint_dir(data_dir: Path, segment: str, name: str) -> Path:
    (found,) = (data_dir / "checkpoints").glob(f"*/{segment}/{name}.*")
    return found


def test_checkpoints_whose_files_vanished_are_reported_after_a_restart_and_refused_on_load(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = str(tiny_model_dir)
    first = start_server(tmp_path, base)
    try:
        service = tinker.ServiceClient(base_url=first.url, api_key=ALICE)
        client = service.create_lora_training_client(base_model=base, rank=4, seed=0).result()
        paths = {name: client.save_state(name).result().path for name in ("kept", "lost", "later")}
        paths["cut"] = client.save_weights_for_sampler("cut").result().path
        run_id = client.model_id
        service.close("success").result()
    finally:
        first.stop()
    shutil.rmtree(checkpoint_dir(tmp_path, "weights", "lost"))  # while the server is down
    weights = checkpoint_dir(tmp_path, "sampler_weights", "cut") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    with caplog.at_level(logging.WARNING, logger="nightlab.train.checkpoints"):
        second = start_server(tmp_path, base)
    try:
        logged = caplog.text
        assert paths["lost"] in logged and "its directory" in logged and "is missing" in logged
        assert paths["cut"] in logged and "bytes, not the" in logged and paths["kept"] not in logged
        listed = httpx.get(
            f"{second.url}/api/v1/training_runs/{run_id}/checkpoints", headers={"X-API-Key": ALICE}
        ).json()["checkpoints"]
        flags = {c["tinker_path"]: c["files_missing"] for c in listed}
        assert flags == {paths["kept"]: False, paths["lost"]: True, paths["later"]: False, paths["cut"]: True}
        rest = tinker.RestClient(base_url=second.url, api_key=ALICE)
        assert len(rest.list_checkpoints(run_id).result().checkpoints) == 4  # the SDK reads the listing
        assert rest.get_training_run(run_id).result().corrupted

        service = tinker.ServiceClient(base_url=second.url, api_key=ALICE)
        with pytest.raises(
            tinker.APIStatusError, match="cannot be loaded: its directory .* is missing"
        ) as exc:
            service.create_training_client_from_state(paths["lost"]).result()
        assert exc.value.status_code == 410
        with pytest.raises(tinker.APIStatusError, match="cannot be loaded: its files .* hold"):
            service.create_sampling_client(model_path=paths["cut"]).result()
        service.create_training_client_from_state(paths["kept"]).result()

        shutil.rmtree(checkpoint_dir(tmp_path, "weights", "later"))  # while the server runs
        with pytest.raises(tinker.APIStatusError, match="cannot be loaded: its directory .* is missing"):
            service.create_training_client_from_state(paths["later"]).result()
        rest.delete_checkpoint_from_tinker_path(paths["lost"]).result()  # the way out the error names
        assert paths["lost"] not in [
            c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints
        ]
        service.close("success").result()
    finally:
        second.stop()
