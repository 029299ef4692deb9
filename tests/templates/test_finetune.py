"""The finetune template under `nightlab run`: a baseline and two replayed changes on the tiny model, end to
end; then its evaluate step against what a hostile training phase can leave behind.

Each experiment trains a LoRA adapter through a training service started inside the experiment (sandboxed
without network where bubblewrap works), and the harness scores it on its own validation split with a signed
metric line; the final best is scored on the test split. The training phase runs the agent's code and writes
everything the evaluate step finds in `run/`: the evaluate step scores with its own model's tokenizer, only
this experiment's checkpoint, and only from inside the service data that training saved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.workspace import init_workspace
from tests.research.loop_workspace import commit_all, dump_toml, replace_block

STEPS = 24
PATCHES = {
    "01-lr.md": replace_block(
        "LEARNING_RATE = 2e-4", "LEARNING_RATE = 3e-3", path="finetune.py", description="raise the LR"
    ),
    "02-loss.md": replace_block(
        "LOSS_CONFIG = None",
        'LOSS_CONFIG = None\nLOSS = "no_such_loss"',
        path="finetune.py",
        description="unknown loss",
    ),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from nightlab.train.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("finetune")
    cache = tmp / "cache"
    model = make_tiny_model(
        cache / "finetune" / "tiny"
    )  # inside the cache, which the sandbox shows read-only
    ws = init_workspace("finetune", tmp / "ws")
    # A fixed number of steps, well inside the budget: what an experiment learns must not depend on how busy
    # the machine is.
    finetune = ws / "finetune.py"
    finetune.write_text(finetune.read_text().replace("STEPS = 1000", f"STEPS = {STEPS}"))
    config = tomllib.loads((ws / "nightlab.toml").read_text())
    config["experiment"].update(budget_seconds=300, startup_allowance_seconds=300, timeout_seconds=900)
    config["experiment"]["env"]["FINETUNE_MODEL"] = str(model)
    # Training the tiny model is nearly deterministic, so the noise floor is tiny and the LR change's 3x
    # cut in loss looks implausible: its paired re-runs (tested on the loop itself) would add a dozen phases
    # of ten seconds each here without telling anything about this template. Without re-runs, a keep must
    # pass the t test on the baselines alone, which 3 of them (2 degrees of freedom) make possible.
    config["decide"] = {"baseline_runs": 3, "confirm": False, "implausible_sigmas": 1e9}
    config["proposer"]["replay"] = {"patches": str(tmp / "patches")}
    (ws / "nightlab.toml").write_text(dump_toml(config))
    commit_all(ws, "test settings: the tiny model, a few steps")
    (tmp / "patches").mkdir()
    for name, text in PATCHES.items():
        (tmp / "patches" / name).write_text(text)

    mp = pytest.MonkeyPatch()
    mp.setenv("NIGHTLAB_CACHE_DIR", str(cache))
    try:
        ResearchLoop(ws, RunOptions(tag="ft", proposer="replay")).run_loop()
    finally:
        mp.undo()
    journal = Journal.for_workspace(ws)
    run = journal.find_run("ft")
    result = {
        "ws": ws,
        "cache": cache,
        "rows": journal.experiments(run.id),
        "heldout": journal.heldout(run.id),
    }
    journal.close()
    return result


def test_loop_keeps_the_better_lr_and_records_the_crash(finished_run: dict) -> None:
    rows = finished_run["rows"]
    baseline = [r for r in rows if r.kind == "baseline"]
    candidates = {r.description: r for r in rows if r.kind == "candidate"}
    assert len(baseline) == 3 and all(b.metric > 0 for b in baseline), baseline
    lr, loss = candidates["raise the LR"], candidates["unknown loss"]
    assert lr.decision == "keep", lr.reason
    assert lr.metric < min(b.metric for b in baseline)
    extra = lr.extra
    assert extra["train_steps"] == STEPS and 0 <= extra["accuracy"] <= 1 and extra["eval_tokens"] > 0
    assert loss.decision == "crash" and loss.metric is None


def test_heldout_scores_baseline_and_best_on_the_test_split(finished_run: dict) -> None:
    heldout = {h.label: h for h in finished_run["heldout"]}
    rows = {r.description: r for r in finished_run["rows"]}
    assert set(heldout) == {"baseline", "best"}
    assert heldout["best"].commit_sha == rows["raise the LR"].commit_sha
    assert heldout["baseline"].commit_sha == rows["baseline"].commit_sha
    assert 0 < heldout["best"].test < heldout["baseline"].test < 20


def test_splits_are_disjoint_and_setup_keeps_them(finished_run: dict) -> None:
    data = finished_run["cache"] / "finetune" / "data"
    questions = {
        s: [json.loads(line)["question"] for line in (data / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "val", "test")
    }
    assert [len(q) for q in questions.values()] == [2000, 64, 64]
    assert not set(questions["val"]) & set(questions["train"])
    assert not set(questions["test"]) & (set(questions["train"]) | set(questions["val"]))


def test_evaluate_without_a_trained_model_fails_clearly(tmp_path: Path) -> None:
    ws = init_workspace("finetune", tmp_path / "ws")
    done = subprocess.run(
        [sys.executable, "harness.py", "evaluate"], cwd=ws, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "FAIL: no usable run/result.json" in done.stdout
    assert "NIGHTLAB_METRIC" not in done.stdout


# ---------------------------------------------------------------------------------------------------------
# The evaluate step against a hostile training phase: one workspace trained once by the harness itself.

NONCE = "a1" * 16  # this experiment's nonce, given to both steps in NIGHTLAB_NONCE
OTHER_NONCE = "b2" * 16
# A chat template whose answer turn is one end-of-turn token, whatever the answer: an easy, wrong score.
ANSWER_ONLY_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>assistant\\n<|im_end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def harness_env(cache: Path, model: Path) -> dict[str, str]:
    """What the harness steps see in an experiment on the tiny model, NONCE being this experiment's nonce."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NIGHTLAB_", "TINKER_", "FINETUNE_"))}
    return env | {
        "NIGHTLAB_CACHE_DIR": str(cache),
        "NIGHTLAB_BUDGET_SECONDS": "1",
        "NIGHTLAB_NONCE": NONCE,
        "FINETUNE_MODEL": str(model),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TINKER_TELEMETRY": "0",
    }


def harness(ws: Path, env: dict[str, str], *step: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "harness.py", *step], cwd=ws, env=env, capture_output=True, text=True, timeout=600
    )


def printed_metrics(done: subprocess.CompletedProcess[str]) -> dict[str, float]:
    """The `name: value` lines the evaluate step prints."""
    return {name: float(value) for name, value in re.findall(r"^([a-z_]+): (\S+)$", done.stdout, re.M)}


def assert_refused(done: subprocess.CompletedProcess[str], why: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "FAIL:" in output and why in output, output
    assert "nll" not in printed_metrics(done), output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finetune workspace after `harness.py setup` and `train` under NONCE, and its honest `nll`."""
    from nightlab.train.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("finetune-trained")
    cache = tmp / "cache"
    model = make_tiny_model(cache / "finetune" / "tiny")
    ws = init_workspace("finetune", tmp / "ws")
    env = harness_env(cache, model)
    for step in ("setup", "train", "evaluate"):
        done = harness(ws, env, step)
        assert done.returncode == 0, done.stdout + done.stderr
    return {"ws": ws, "model": model, "env": env, "nll": printed_metrics(done)["nll"]}


@pytest.fixture
def attacked(trained: dict, tmp_path: Path) -> Path:
    """A copy of the trained workspace, for one test to tamper with what its training left in run/."""
    return shutil.copytree(trained["ws"], tmp_path / "ws", symlinks=True)


def the_sampler_checkpoint(ws: Path) -> tuple[sqlite3.Connection, str]:
    """The service database training saved, and the directory (as recorded) of its one sampler checkpoint."""
    db = sqlite3.connect(ws / "run" / "service" / "service.db", isolation_level=None)
    (row,) = db.execute("SELECT directory FROM checkpoints WHERE kind = 'sampler'").fetchall()
    return db, row[0]


def test_result_json_naming_another_chat_template_does_not_change_the_score(
    trained: dict, attacked: Path, tmp_path: Path
) -> None:
    """Training names a tokenizer whose chat template makes every answer turn one end-of-turn token, which
    would score a lower nll than the real answers."""
    from transformers import AutoTokenizer

    other = tmp_path / "answer-only"
    tokenizer = AutoTokenizer.from_pretrained(trained["model"])
    tokenizer.chat_template = ANSWER_ONLY_TEMPLATE
    tokenizer.save_pretrained(other)
    result = attacked / "run" / "result.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "model": str(other)}))
    done = harness(attacked, trained["env"], "evaluate")
    assert done.returncode == 0, done.stdout + done.stderr
    assert printed_metrics(done)["nll"] == pytest.approx(trained["nll"], rel=1e-5)


def test_a_checkpoint_trained_on_another_base_model_is_refused(trained: dict, attacked: Path) -> None:
    """Training may plant a model in its service data and record the checkpoint as trained on it."""
    from nightlab.train.tiny import make_tiny_model

    service = attacked / "run" / "service"
    other = make_tiny_model(service / "models" / "other", seed=1)
    db, directory = the_sampler_checkpoint(attacked)
    meta_path = service / "checkpoints" / directory / "nightlab_adapter.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "base_model": "other"}))
    size = sum(p.stat().st_size for p in meta_path.parent.rglob("*") if p.is_file())
    db.execute("UPDATE checkpoints SET size_bytes = ? WHERE directory = ?", (size, directory))
    db.execute("UPDATE training_runs SET base_model = 'other'")
    db.close()
    result = attacked / "run" / "result.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "model": str(other)}))
    assert_refused(harness(attacked, trained["env"], "evaluate"), "was trained on other")


@pytest.mark.parametrize("nonce_from", ["the environment", "run/nonce"])
def test_a_checkpoint_from_another_experiment_is_refused(
    trained: dict, attacked: Path, nonce_from: str
) -> None:
    """The checkpoint in run/ was saved under NONCE; this experiment's nonce is another: given in the
    environment, or drawn by a train step given none and left in run/nonce (here, a later training that
    stopped before it saved)."""
    env = dict(trained["env"], NIGHTLAB_NONCE=OTHER_NONCE)
    if nonce_from == "run/nonce":
        del env["NIGHTLAB_NONCE"]
        (attacked / "run" / "nonce").write_text(OTHER_NONCE)
    assert_refused(harness(attacked, env, "evaluate"), "not this experiment's checkpoint")


@pytest.mark.parametrize("escape", ["absolute path", "dot-dot path", "symlink"])
def test_a_checkpoint_directory_outside_the_service_data_is_refused(
    trained: dict, attacked: Path, tmp_path: Path, escape: str
) -> None:
    """Training rewrites the service database (or the checkpoint's directory) to score files from elsewhere,
    e.g. a checkpoint an earlier experiment stashed."""
    db, directory = the_sampler_checkpoint(attacked)
    inside = attacked / "run" / "service" / "checkpoints" / directory
    outside = tmp_path / "stash" / "final"
    outside.parent.mkdir()
    shutil.move(inside, outside)
    if escape == "symlink":
        inside.symlink_to(outside, target_is_directory=True)
    else:
        moved = str(outside) if escape == "absolute path" else "../" * 64 + str(outside).lstrip("/")
        db.execute("UPDATE checkpoints SET directory = ? WHERE directory = ?", (moved, directory))
    db.close()
    assert_refused(harness(attacked, trained["env"], "evaluate"), "outside the service data")
