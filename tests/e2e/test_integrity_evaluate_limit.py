"""Training inside the evaluator: the evaluate step gets its own time limit, measured from the baseline's.

A harness that scores a model has to run the model's code; code that does its real work there (trains on
while it is being scored) would buy its gain with time the budget does not give. The evaluate step of a
candidate may take the baseline's slowest evaluation plus a tolerance and an allowance; past that it is an
`overrun`, recorded with the limit, whatever it scores.
"""

from __future__ import annotations

import pytest

from nightlab.config import ExperimentSection
from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from tests.research.loop_workspace import make_workspace, replace_block

# A harness step that imports the editable module before it scores, as an evaluator of model code must.
SCORE = '''"""Score the knobs of run/model.json after importing train.py, and sign the result."""

import json
import os
from pathlib import Path

from evaluate import loss

from nightlab.harness import sign_metrics


def main():
    key = os.environ.pop("NIGHTLAB_METRIC_KEY")
    import train  # noqa: F401  (editable code runs from here on)

    model = json.loads(Path("run/model.json").read_text())
    print(sign_metrics({"loss": loss(model["knobs"], int(model["seed"]), "val")}, key))


if __name__ == "__main__":
    main()
'''
LOWER_LR = ("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05")
# The gain of a lower learning rate, bought with 6 s of "training" while the harness scores.
TRAIN_WHILE_SCORED = replace_block(
    LOWER_LR[0],
    LOWER_LR[1] + '\nif os.environ.get("NIGHTLAB_PHASE") == "evaluate":\n    time.sleep(6)',
    description="train on while being scored",
)
HONEST = replace_block(*LOWER_LR, description="lower the LR")
ALLOWANCE = 2.0


@pytest.fixture(scope="module")
def evaluate_run(tmp_path_factory):
    root = make_workspace(
        tmp_path_factory.mktemp("evaluate-limit"),
        config={
            "experiment": {
                "evaluate": "python score.py",
                "heldout": None,
                "budget_seconds": 1.0,
                "startup_allowance_seconds": ALLOWANCE,
                "timeout_seconds": 30.0,
            },
            "decide": {"baseline_runs": 2},
        },
        files={"score.py": SCORE},
        patches={"1.md": TRAIN_WHILE_SCORED, "2.md": HONEST},
    )
    state = ResearchLoop(root, RunOptions(tag="eval", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("eval").id)
    journal.close()
    return state, rows


def test_work_done_while_being_scored_is_an_overrun(evaluate_run):
    state, rows = evaluate_run
    slowest = max(r.timings["evaluate"] for r in rows if r.kind == "baseline")
    tolerance = ExperimentSection.model_fields["evaluate_tolerance"].default
    row = next(r for r in rows if r.description == "train on while being scored")
    assert row.decision == "overrun" and row.metric is None
    assert row.evaluate_limit == pytest.approx(slowest * (1 + tolerance) + ALLOWANCE)
    assert row.timings["evaluate"] > row.evaluate_limit
    assert row.reason.startswith("the evaluate phase took ")
    assert f"over its limit {row.evaluate_limit:.1f}s" in row.reason and "outside the budget" in row.reason
    assert state.best_commit != row.commit_sha


def test_the_same_gain_scored_in_normal_time_is_kept(evaluate_run):
    _, rows = evaluate_run
    row = next(r for r in rows if r.description == "lower the LR")
    assert row.decision == "keep" and row.timings["evaluate"] < row.evaluate_limit
