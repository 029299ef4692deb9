"""No compute spent twice, and a run that stops keeping changes notices: the novelty gate and the plateau.

A proposal whose code the run already measured (after formatting, comments and docstrings are set aside) is
recorded as `duplicate` without running and handed back with the earlier result; a streak of candidates
that keep nothing is a plateau, which the proposer is told about, or which ends the run when so configured.
"""

from __future__ import annotations

import pytest

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.report import build_report
from tests.e2e.test_loop import Recording
from tests.research.loop_workspace import make_workspace, replace_block

LOWER_LR = replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR")
PATCHES = {
    "1-lr.md": LOWER_LR,
    # The kept change again, written differently: a comment, another float spelling, a new docstring.
    "2-restyled.md": replace_block(
        "LEARNING_RATE = 0.05",
        "LEARNING_RATE = 5e-2  # the same value, spelled otherwise",
        description="restyle the LR",
    ),
    "3-docstring.md": replace_block(
        "def main() -> None:",
        'def main() -> None:\n    """Write the knobs for the harness."""',
        description="document main",
    ),
    # Back to the baseline's value: the baseline measured this code.
    "4-revert.md": replace_block("LEARNING_RATE = 0.05", "LEARNING_RATE = 0.3", description="revert the LR"),
    "5-width.md": replace_block("WIDTH = 4", "WIDTH = 3", description="narrow"),
}


@pytest.fixture(scope="module")
def novelty_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("novelty")
    root = make_workspace(
        tmp, config={"decide": {"baseline_runs": 2}, "proposer": {"plateau_after": 3}}, patches=PATCHES
    )
    proposer = Recording(tmp / "patches")
    ResearchLoop(root, RunOptions(tag="n"), proposer=proposer).run_loop()
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("n").id)
    journal.close()
    return root, {r.description: r for r in rows if r.kind == "candidate"}, proposer


def test_code_already_measured_is_not_run_again(novelty_run):
    _, rows, proposer = novelty_run
    kept = rows["lower the LR"]
    assert kept.decision == "keep"
    for what in ("restyle the LR", "document main"):
        dup = rows[what]
        assert dup.decision == "duplicate", dup.reason
        assert f"duplicate of #{kept.number} (lower the LR)" in dup.reason
        assert dup.metric is None and dup.timings == {} and dup.commit_sha
    revert = rows["revert the LR"]
    assert revert.decision == "duplicate" and revert.reason.startswith("duplicate of the baseline")
    outcomes = {o.reason: o for o in proposer.outcomes}
    assert outcomes[rows["restyle the LR"].reason].metric == pytest.approx(kept.metric)
    # The next proposal hears why the last one was not run.
    assert proposer.contexts[4].last_invalid_reason == revert.reason


def test_a_streak_without_a_keep_is_a_plateau_the_proposer_is_told_and_the_report_shows(novelty_run):
    root, rows, proposer = novelty_run
    assert [c.plateau for c in proposer.contexts] == [0, 0, 0, 0, 3, 4]
    assert rows["narrow"].decision == "discard"
    report = build_report(root, "n").report.read_text()
    first, last = rows["restyle the LR"].number, rows["narrow"].number
    assert f"plateau: #{first} to #{last}, 4 experiments in a row kept nothing" in report
    assert "3 proposals repeated code already measured" in report


def test_on_plateau_stop_ends_the_run_saying_why(tmp_path):
    root = make_workspace(
        tmp_path,
        config={"decide": {"baseline_runs": 2}, "proposer": {"plateau_after": 2, "on_plateau": "stop"}},
        patches={
            "1.md": replace_block("WIDTH = 4", "WIDTH = 3", description="narrow"),
            "2.md": replace_block("MOMENTUM = 0.5", "MOMENTUM = 0.49", description="nudge"),
            "3.md": LOWER_LR,
        },
    )
    state = ResearchLoop(root, RunOptions(tag="s", proposer="replay")).run_loop()
    assert state.experiments == 2 and state.keeps == 0
    assert state.stop_reason.startswith("plateau: the last 2 experiments kept nothing")
