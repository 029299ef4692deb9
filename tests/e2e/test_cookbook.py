"""tinker-cookbook's own recipes, unmodified, against `nightlab serve` on 127.0.0.1 with no network beyond it.

The server runs as a real process (`python -m nightlab.cli serve`), the recipes as `python -m
tinker_cookbook...` with the model name a local model directory, so the cookbook's client side finds the
tokenizer offline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cookbook_support import (
    cookbook_command,
    cookbook_data,
    nightlab_serve,
    read_jsonl,
    run_cookbook,
    server_checkpoint_paths,
    start_cookbook,
)

pytest.importorskip("tinker_cookbook")


def test_without_the_cookbook_this_module_is_skipped_not_broken() -> None:
    """Collect this file in a Python where `import tinker_cookbook` fails: the result is a skip, not an
    error."""
    blocked = (
        "import sys; sys.modules['tinker_cookbook'] = None; import pytest; "
        f"sys.exit(pytest.main([{__file__!r}, '--collect-only', '-q', '-p', 'no:cacheprovider']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, done.stdout + done.stderr
    assert "could not import 'tinker_cookbook'" in done.stdout and "error" not in done.stdout.lower(), (
        done.stdout
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nightlab.train.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("cookbook-model") / "tiny")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("cookbook-serve")
    with nightlab_serve(root / "data", root / "serve.log", tiny_model) as url:
        yield url


def chat_sl(model: Path | str, url: str, log_path: Path, behavior: str, max_steps: int) -> list[str]:
    return cookbook_command(
        "chat_sl.train",
        model_name=model,
        renderer_name="role_colon",
        base_url=url,
        log_path=log_path,
        dataset=cookbook_data() / "conversations.jsonl",
        batch_size=8,
        max_length=128,
        lora_rank=4,
        learning_rate=1e-3,
        max_steps=max_steps,
        save_every=2,
        eval_every=0,
        infrequent_eval_every=0,
        behavior_if_log_dir_exists=behavior,
    )


def math_rl(model: Path | str, url: str, log_path: Path, max_steps: int) -> list[str]:
    return cookbook_command(
        "math_rl.train",
        env="arithmetic",
        model_name=model,
        renderer_name="role_colon",
        base_url=url,
        log_path=log_path,
        group_size=4,
        groups_per_batch=2,
        max_tokens=5,
        lora_rank=4,
        max_steps=max_steps,
        save_every=1,
        eval_every=0,
        behavior_if_log_dir_exists="delete",
    )


def rl_step_metrics(log_path: Path) -> list[dict]:
    """math_rl's per-step rows (0.6.1 ends metrics.jsonl with a row of cumulative token counts alone)."""
    return [m for m in read_jsonl(log_path / "metrics.jsonl") if "env/all/total_episodes" in m]


def _interrupt_after_first_checkpoint(
    cmd: list[str], log_path: Path, out: Path, timeout_s: float = 300
) -> dict:
    """Start a run and kill it (SIGKILL, no clean shutdown) as soon as it has recorded a resumable
    checkpoint."""
    proc = start_cookbook(cmd, out)
    ckpts = log_path / "checkpoints.jsonl"
    deadline = time.monotonic() + timeout_s
    try:
        while not (ckpts.is_file() and any("state_path" in row for row in read_jsonl(ckpts))):
            assert proc.poll() is None, (
                f"the run ended ({proc.returncode}) before saving:\n{out.read_text()[-4000:]}"
            )
            assert time.monotonic() < deadline, (
                f"no checkpoint after {timeout_s} s:\n{out.read_text()[-4000:]}"
            )
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rows = read_jsonl(ckpts)
    assert rows[-1]["name"] != "final", "the run finished before it could be interrupted; give it more steps"
    return rows[-1]


def test_chat_sl_saves_and_resumes(tiny_model: Path, server: str, tmp_path: Path) -> None:
    log_path, out = tmp_path / "chat_sl", tmp_path / "chat_sl.out"
    steps = 8
    saved = _interrupt_after_first_checkpoint(
        chat_sl(tiny_model, server, log_path, "delete", steps), log_path, out
    )
    assert saved["state_path"].startswith("tinker://") and saved["batch"] in (2, 4, 6)

    run_cookbook(chat_sl(tiny_model, server, log_path, "resume", steps), out)

    logs = out.read_text()
    assert f"Resumed training from {saved['state_path']}" in logs
    metrics = read_jsonl(log_path / "metrics.jsonl")
    resumed = metrics[-(steps - saved["batch"]) :]
    assert [m["step"] for m in resumed] == list(range(saved["batch"], steps))
    assert all(m["num_sequences"] == 8 and m["train_mean_nll"] > 0 for m in resumed)
    first_nll = metrics[0]["train_mean_nll"]
    assert sum(m["train_mean_nll"] for m in metrics[-2:]) / 2 < first_nll, "loss did not go down at lr 1e-3"

    rows = read_jsonl(log_path / "checkpoints.jsonl")
    assert rows[-1]["name"] == "final"
    listed = server_checkpoint_paths(server)
    for row in rows:
        assert {row["state_path"], row["sampler_path"]} <= listed, (
            f"{row['name']} missing from the server's list"
        )


def test_math_rl_arithmetic(tiny_model: Path, server: str, tmp_path: Path) -> None:
    """math_rl trains with its default loss, stable_reinforce: the server refuses any datum whose provenance
    does not name, token for token, sequences it recorded while sampling, so a finished run is one whose
    every datum was matched to what the sampler recorded."""
    log_path, out = tmp_path / "math_rl", tmp_path / "math_rl.out"
    run_cookbook(math_rl(tiny_model, server, log_path, max_steps=2), out)

    assert json.loads((log_path / "config.json").read_text())["loss_fn"] == "stable_reinforce"
    metrics = rl_step_metrics(log_path)
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["env/all/total_episodes"] == 8  # groups_per_batch x group_size samples, scored by the env
        assert m["env/all/total_ac_tokens"] > 0
        # The sampler's logprobs and the trainer's agree: same weights, same numerics.
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-3
    rows = read_jsonl(log_path / "checkpoints.jsonl")
    assert [r["name"] for r in rows] == ["000001", "000002", "final"]
    listed = server_checkpoint_paths(server)
    assert {r["state_path"] for r in rows} <= listed and {r["sampler_path"] for r in rows} <= listed


@pytest.mark.slow
def test_cookbook_on_smollm2(server: str, tmp_path: Path) -> None:
    """The same recipes on the offline SmolLM2, prepared into a model directory by `nightlab models
    prepare`."""
    prepared = subprocess.run(
        [
            sys.executable,
            "-m",
            "nightlab.cli",
            "models",
            "prepare",
            "smollm2",
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    model = prepared.stdout.strip().splitlines()[-1].removeprefix("use it as model_name: ").strip()
    assert Path(model, "config.json").is_file()

    sl_log = tmp_path / "chat_sl"
    run_cookbook(
        chat_sl(model, server, sl_log, "delete", max_steps=2), tmp_path / "chat_sl.out", timeout_s=900
    )
    assert [m["step"] for m in read_jsonl(sl_log / "metrics.jsonl")] == [0, 1]

    rl_log = tmp_path / "math_rl"
    run_cookbook(math_rl(model, server, rl_log, max_steps=1), tmp_path / "math_rl.out", timeout_s=900)
    assert [m["step"] for m in rl_step_metrics(rl_log)] == [0]
    assert read_jsonl(rl_log / "checkpoints.jsonl")[-1]["name"] == "final"
