"""Drift: a machine that gets faster (or quieter) during a run must not produce a keep.

The harness here adds a planted drift to the honest quadratic loss: the first evaluations of the run (the
baselines) run "under load" and score worse, every later one scores as the code deserves. A change that
does nothing, measured after the drift, looks like a large gain over the baselines' mean; compared with the
best re-measured beside it, it is nothing. A real gain, measured the same way, is still kept.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from tests.research.loop_workspace import make_workspace, replace_block

# The quadratic harness, plus the drift: `DRIFT` worse for the first `LOADED` evaluations of the run, counted
# in a file outside the workspace (the machine's state, not the code's).
DRIFTING_EVALUATE = '''"""The quadratic loss of run/model.json, worse while the machine is loaded."""

import json
import os
import sys
from pathlib import Path

from nightlab.harness import read_key, reexec_without_key, sign_metrics

OPTIMUM = {"LEARNING_RATE": 0.05, "WIDTH": 16.0, "MOMENTUM": 0.9}
SCALE = {"LEARNING_RATE": 0.1, "WIDTH": 8.0, "MOMENTUM": 0.2}
NOISE = 0.01
DRIFT = 0.1
LOADED = 2


def loss(knobs, seed, split="val"):
    import random

    rng = random.Random(seed)
    return sum(((float(knobs[k]) - OPTIMUM[k]) / SCALE[k]) ** 2 for k in OPTIMUM) + NOISE * rng.gauss(0, 1)


def main():
    reexec_without_key()
    key = read_key()
    counter = Path(os.environ["DRIFT_COUNTER"])
    count = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(count))
    model = json.loads(Path("run/model.json").read_text())
    value = loss(model["knobs"], int(model["seed"])) + (DRIFT if count <= LOADED else 0.0)
    print(f"loss: {value:.6f} (evaluation {count})")
    print(sign_metrics({"loss": value}, key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''
# New code (a comment alone would be refused as a duplicate before it ran) that computes what the old did.
NO_OP = replace_block("SEED = 42", "SEED = 40 + 2", description="spell the seed as a sum")
# 0.39 better (about 39 noise): a real gain, below the plausibility guard.
REAL = replace_block("MOMENTUM = 0.5", "MOMENTUM = 0.52", description="raise the momentum")


@pytest.fixture(scope="module")
def drift_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    root = make_workspace(
        tmp,
        config={
            "experiment": {"heldout": None, "env": {"DRIFT_COUNTER": str(tmp / "machine-load")}},
            "decide": {"baseline_runs": 2},
        },
        files={"evaluate.py": DRIFTING_EVALUATE},
        patches={"1.md": NO_OP, "2.md": REAL},
    )
    state = ResearchLoop(root, RunOptions(tag="drift", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("drift").id)
    journal.close()
    return root, state, {r.description: r for r in rows}


def test_a_change_that_does_nothing_is_not_kept_when_the_machine_drifts(drift_run):
    _, state, rows = drift_run
    no_op = rows["spell the seed as a sum"]
    assert no_op.metric_runs[0] < rows["baseline"].metric - 0.05  # it looked like a large gain
    assert no_op.decision == "discard" and no_op.reason.startswith("not confirmed after")
    # The best was measured again beside the candidate's re-runs, in the same (quiet) period.
    assert no_op.best_reruns and all(abs(b - no_op.metric_runs[0]) < 0.05 for b in no_op.best_reruns)
    assert {"train (best 1)", "evaluate (best 1)", "train (confirm 1)"} <= set(no_op.timings)
    assert state.best_commit != no_op.commit_sha


def test_a_real_gain_is_still_kept_under_drift(drift_run):
    _, state, rows = drift_run
    real = rows["raise the momentum"]
    assert real.decision == "keep" and real.reason.startswith("confirmed by")
    assert len(real.best_reruns) == len(real.metric_runs) - 1
    assert state.best_commit == real.commit_sha


def test_the_report_shows_the_best_re_measured(drift_run, tmp_path):
    root, _, rows = drift_run
    result = CliRunner().invoke(app, ["report", "-C", str(root), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "## The best, re-measured beside the candidates" in text
    no_op = rows["spell the seed as a sum"]
    mean = sum(no_op.best_reruns) / len(no_op.best_reruns)
    assert f"| {no_op.number} | {no_op.best_before:.6g} | {mean:.6g} |" in text
