"""tinygpt end to end on a tiny model: train.py's summary and checkpoint, and the signed evaluate step."""

from __future__ import annotations

import hashlib
import hmac
import json
import re

import pytest

from tests.templates.tinygpt_support import TINY, env_for, make_workspace, run_py, summary, write_corpus

KEY = "test-key-0123456789"
SIGNED = re.compile(r"^NIGHTLAB_METRIC (\{.*\}) ([0-9a-f]{64})$", re.MULTILINE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace copy with prepared data and one short by-hand training run."""
    root = tmp_path_factory.mktemp("tinygpt_run")
    write_corpus(root / "corpus")
    ws = make_workspace(root)
    env = env_for(root / "cache", root / "corpus", **TINY)
    prep = run_py(ws, ["prepare.py"], env)
    assert prep.returncode == 0, prep.stderr
    run = run_py(ws, ["train.py"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    return ws, env, run


def _evaluate(ws, env, *extra: str, key: str | None = None):
    env = dict(env)
    if key:
        env["NIGHTLAB_METRIC_KEY"] = key
    return run_py(ws, ["prepare.py", "evaluate", *extra], env)


def _variant(ws, name: str, code: str):
    """train.py plus extra code appended, saved next to it for `--train-file`."""
    path = ws / name
    path.write_text((ws / "train.py").read_text() + "\n\n" + code)
    return path


def test_train_prints_a_parseable_summary_and_saves_a_checkpoint(trained):
    ws, _, run = trained
    numbers = summary(run.stdout)
    for name in ("val_bpb", "training_seconds", "total_seconds", "peak_memory_mb", "mfu_percent",
                 "total_tokens_M", "num_steps", "num_params_M", "depth"):
        assert name in numbers, f"{name} missing from the summary"
    assert numbers["depth"] == 1 and numbers["num_steps"] >= 2  # one untimed warm-up step, then timed ones
    assert numbers["training_seconds"] >= 2 and 0 < numbers["val_bpb"] < 20
    assert (ws / "run" / "checkpoint.pt").stat().st_size > 0
    config = json.loads((ws / "run" / "model.json").read_text())["config"]
    assert config["n_layer"] == 1 and config["n_embd"] == 32


def test_evaluate_prints_a_signed_metric_and_hides_the_key_from_train_py(trained, tmp_path):
    ws, env, run = trained
    leak = tmp_path / "leak.txt"
    spy = _variant(ws, "train_spy.py", (  # an otherwise faithful train.py that looks for the key on import
        "import os, pathlib\n"
        f"pathlib.Path({str(leak)!r}).write_bytes(os.environ.get('NIGHTLAB_METRIC_KEY', '').encode()\n"
        "    + pathlib.Path('/proc/self/environ').read_bytes())\n"
    ))
    done = _evaluate(ws, env, "--split", "val", "--train-file", str(spy), key=KEY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert leak.exists() and KEY.encode() not in leak.read_bytes()
    payload, signature = SIGNED.search(done.stdout).groups()
    assert hmac.compare_digest(signature, hmac.new(KEY.encode(), payload.encode(), hashlib.sha256).hexdigest())
    metrics = json.loads(payload)
    assert payload == json.dumps(metrics, sort_keys=True, separators=(",", ":"))
    assert set(metrics) == {"val_bpb", "eval_seconds", "eval_tokens"}
    assert metrics["val_bpb"] == pytest.approx(summary(run.stdout)["val_bpb"], abs=2e-6)
    assert f"val_bpb: {metrics['val_bpb']:.6f}" in done.stdout


def test_evaluate_without_a_key_prints_only_the_human_line(trained):
    ws, env, _ = trained
    done = _evaluate(ws, env, "--split", "test")
    assert done.returncode == 0, done.stderr
    assert "NIGHTLAB_METRIC" not in done.stdout
    assert re.search(r"^val_bpb: \d+\.\d+$", done.stdout, re.MULTILINE)


def test_evaluate_rejects_a_model_that_looks_ahead(trained):
    ws, env, _ = trained
    leaky = _variant(ws, "train_leaky.py", (
        "_forward = GPT.forward\n"
        "def _peek(self, idx, targets=None):\n"
        "    out = _forward(self, idx, targets)\n"
        "    return out + idx.float().mean(dim=1, keepdim=True)[..., None] if targets is None else out\n"
        "GPT.forward = _peek\n"
    ))
    done = _evaluate(ws, env, "--train-file", str(leaky), key=KEY)
    assert done.returncode == 1
    assert re.search(r"^FAIL: .*not causal", done.stdout, re.MULTILINE)
    assert "NIGHTLAB_METRIC" not in done.stdout


@pytest.mark.parametrize("patch", [
    "import __main__\n__main__.evaluate_bpb = lambda *a, **k: 0.0\n",
    "import torch.nn.functional\ntorch.nn.functional.cross_entropy = lambda *a, **k: a[0].sum() * 0\n",
], ids=["evaluator", "torch"])
def test_evaluate_rejects_a_module_that_patches_the_evaluator(trained, patch):
    ws, env, _ = trained
    cheat = _variant(ws, "train_cheat.py", patch)
    done = _evaluate(ws, env, "--train-file", str(cheat), key=KEY)
    assert done.returncode == 1
    assert "FAIL: train.py changed the evaluation code" in done.stdout
    assert "NIGHTLAB_METRIC" not in done.stdout


def test_a_diverging_run_ends_with_fail(trained):
    ws, env, _ = trained
    done = run_py(ws, ["train.py"], {**env, "TINYGPT_EMBED_LR": "1e30", "TINYGPT_HEAD_LR": "1e30", "NIGHTLAB_PHASE": "train"})
    assert done.returncode == 1
    assert re.search(r"^FAIL: loss is .* \(diverged\)", done.stdout, re.MULTILINE)
