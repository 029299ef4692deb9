"""Early abort end to end: a training whose printed progress is hopeless stops early and is recorded as
`aborted` with its curve; a good change runs its whole budget and is kept; printing good progress does not
help bad code be kept."""

from __future__ import annotations

import pytest

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.report import build_report
from tests.research.loop_workspace import make_workspace, replace_block

BUDGET = 2.0
READINGS = 10  # the quadratic template's simulated training prints ten progress readings
# The line of the template's simulated training that prints its progress, and a liar's version of it.
PROGRESSING = "{loss(knobs, seed, 'val') + 10.0 * (1 - step / steps):.4f}"
LIAR = replace_block(
    f'    print(f"step {{step}} | loss {PROGRESSING}", flush=True)',
    '    print(f"step {step} | loss 0.0", flush=True)',
)


@pytest.fixture(scope="module")
def abort_run(tmp_path_factory):
    root = make_workspace(
        tmp_path_factory.mktemp("abort"),
        config={
            "experiment": {
                "budget_seconds": BUDGET,
                "timeout_seconds": 60.0,
                "env": {"QUADRATIC_WORK_SECONDS": str(0.9 * BUDGET)},
            },
            "metric": {"progress": "loss"},
            "decide": {"baseline_runs": 2},
        },
        patches={
            "1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 1.0", description="raise the LR"),
            "2.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR"),
            "3.md": replace_block("WIDTH = 4", "WIDTH = 1", description="narrow, print 0 loss") + LIAR,
        },
    )
    ResearchLoop(root, RunOptions(tag="a", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("a").id)
    journal.close()
    baselines = [r for r in rows if r.kind == "baseline"]
    return {r.description: r for r in rows if r.kind == "candidate"}, baselines, root


def test_a_hopeless_run_is_stopped_early_with_its_curve(abort_run):
    rows, baselines, _ = abort_run
    assert all(len(b.curve) == READINGS for b in baselines)
    raised = rows["raise the LR"]
    assert raised.decision == "aborted" and raised.metric is None, raised.reason
    assert raised.reason.startswith("aborted at ") and "behind every kept run's" in raised.reason
    assert 3 <= len(raised.curve) < READINGS  # the readings it made before it was stopped
    assert raised.timings["train"] < 0.9 * min(b.timings["train"] for b in baselines)


def test_a_good_change_runs_its_budget_and_is_kept(abort_run):
    rows, _, _ = abort_run
    lower = rows["lower the LR"]
    assert lower.decision == "keep" and len(lower.curve) == READINGS


def test_the_report_draws_the_curves(abort_run, tmp_path):
    _, _, root = abort_run
    files = build_report(root, "a", tmp_path)
    assert files.curves is not None and files.curves.stat().st_size > 10_000
    assert "![training progress](curves.png)" in files.report.read_text()


def test_printed_progress_never_helps_bad_code_be_kept(abort_run):
    rows, _, _ = abort_run
    liar = rows["narrow, print 0 loss"]
    assert liar.decision == "discard" and liar.metric is not None
    assert all(value == 0.0 for _, value in liar.curve)
