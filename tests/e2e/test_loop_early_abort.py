"""Early abort end to end: a training whose printed progress is hopeless stops early and is recorded as
`aborted` with its curve; a good change runs its whole budget and is kept; printing good progress does not
help bad code be kept."""

from __future__ import annotations

import pytest

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from tests.research.loop_workspace import make_workspace, replace_block

BUDGET = 2.0
READINGS = 10
# The quadratic toy's train.py, "training" for the budget: ten progress readings that fall towards the
# loss its knobs will score, with seeded noise, then the knobs for the harness.
TRAIN = f'''"""Knobs for the quadratic harness, with a progress curve on the way."""

import json
import os
import random
import time
from pathlib import Path

LEARNING_RATE = 0.3
WIDTH = 4
PRINTED = None
MOMENTUM = 0.5
SEED = 42
OPTIMUM = {{"LEARNING_RATE": 0.05, "WIDTH": 16.0, "MOMENTUM": 0.9}}
SCALE = {{"LEARNING_RATE": 0.1, "WIDTH": 8.0, "MOMENTUM": 0.2}}


def main():
    seed = SEED + int(os.environ.get("NIGHTLAB_SEED_OFFSET", "0"))
    rng = random.Random(seed)
    knobs = {{"LEARNING_RATE": LEARNING_RATE, "WIDTH": WIDTH, "MOMENTUM": MOMENTUM}}
    bowl = sum(((knobs[k] - OPTIMUM[k]) / SCALE[k]) ** 2 for k in OPTIMUM)
    for i in range({READINGS}):
        time.sleep({BUDGET} / {READINGS})
        loss = bowl + 10.0 * (1 - i / {READINGS}) + rng.gauss(0.0, 0.05)
        print(f"step {{i}} | loss {{loss if PRINTED is None else PRINTED:.4f}}", flush=True)
    Path("run").mkdir(exist_ok=True)
    Path("run/model.json").write_text(json.dumps({{"knobs": knobs, "seed": seed}}))


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def abort_run(tmp_path_factory):
    root = make_workspace(
        tmp_path_factory.mktemp("abort"),
        config={
            "experiment": {"budget_seconds": BUDGET, "timeout_seconds": 60.0},
            "metric": {"progress": "loss"},
            "decide": {"baseline_runs": 2},
        },
        files={"train.py": TRAIN},
        patches={
            "1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 1.0", description="raise the LR"),
            "2.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR"),
            "3.md": replace_block(
                "WIDTH = 4\nPRINTED = None",
                "WIDTH = 1\nPRINTED = 0.0",
                description="narrow, printing a great loss",
            ),
        },
    )
    ResearchLoop(root, RunOptions(tag="a", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("a").id)
    journal.close()
    baselines = [r for r in rows if r.kind == "baseline"]
    return {r.description: r for r in rows if r.kind == "candidate"}, baselines


def test_a_hopeless_run_is_stopped_early_with_its_curve(abort_run):
    rows, baselines = abort_run
    assert all(len(b.curve) == READINGS for b in baselines)
    raised = rows["raise the LR"]
    assert raised.decision == "aborted" and raised.metric is None, raised.reason
    assert raised.reason.startswith("aborted at ") and "behind every kept run's" in raised.reason
    assert 3 <= len(raised.curve) < READINGS  # the readings it made before it was stopped
    assert raised.timings["train"] < 0.9 * min(b.timings["train"] for b in baselines)


def test_a_good_change_runs_its_budget_and_is_kept(abort_run):
    rows, _ = abort_run
    lower = rows["lower the LR"]
    assert lower.decision == "keep" and len(lower.curve) == READINGS


def test_printed_progress_never_helps_bad_code_be_kept(abort_run):
    rows, _ = abort_run
    liar = rows["narrow, printing a great loss"]
    assert liar.decision == "discard" and liar.metric is not None
    assert all(value == 0.0 for _, value in liar.curve)
