"""The finetune template under `nightlab run`: a baseline and two replayed changes on the tiny model, end to
end.

Each experiment trains a LoRA adapter through a training service started inside the experiment (sandboxed
without network where bubblewrap works), and the harness scores it on its own validation split with a signed
metric line; the final best is scored on the test split.
"""

from __future__ import annotations

import json
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
    config["decide"] = {"baseline_runs": 2}
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
    assert len(baseline) == 2 and all(b.metric > 0 for b in baseline), baseline
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
