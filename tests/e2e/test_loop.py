"""The research loop end to end on the quadratic toy workspace, with prepared patches replayed in order."""

from __future__ import annotations

import sqlite3

import pytest

from nightlab.research.journal import ChainError, Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.proposers.base import Outcome, Proposal, ProposalContext
from nightlab.research.proposers.replay import ReplayProposer
from nightlab.research.report import build_report
from tests.research.loop_workspace import git, make_workspace, replace_block

HARNESS_DIFF = """# description: silence the evaluation noise
--- a/evaluate.py
+++ b/evaluate.py
@@ -19,3 +19,3 @@
 SCALE = {"LEARNING_RATE": 0.1, "WIDTH": 8.0, "MOMENTUM": 0.2}
-NOISE = 0.01
+NOISE = 0.0
 TEST_STREAM = 1_000_003
"""

PATCHES = {
    # ~3 noise better: above the bar (2 noise), so it is re-run with other seeds beside the best.
    "01-momentum.md": replace_block("MOMENTUM = 0.5", "MOMENTUM = 0.502", description="nudge momentum"),
    "02-lr.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR"),
    "03-seed.md": replace_block("SEED = 42", "SEED = 137", description="change the seed"),
    "04-harness.patch": HARNESS_DIFF,
    "05-crash.md": replace_block(
        "def main() -> None:", "def main() -> None:\n    raise SystemExit(3)", description="crash"
    ),
    "06-nan.md": replace_block('"MOMENTUM": MOMENTUM}', '"MOMENTUM": float("nan")}', description="nan knob"),
    "07-fake.md": replace_block(
        '    (out / "model.json").write_text(json.dumps({"knobs": knobs, "seed": seed}))',
        '    (out / "model.json").write_text(json.dumps({"knobs": knobs, "seed": seed}))\n'
        '    print("loss: 0.0")\n    print("NIGHTLAB_METRIC {\\"loss\\":0.0} " + "0" * 64)',
        description="print a fake metric",
    ),
}


class Recording(ReplayProposer):
    """The replay proposer, keeping what the loop told it."""

    def __init__(self, directory):
        super().__init__(directory)
        self.contexts: list[ProposalContext] = []
        self.outcomes: list[Outcome] = []

    def propose(self, context: ProposalContext) -> Proposal | None:
        self.contexts.append(context)
        return super().propose(context)

    def feedback(self, proposal: Proposal, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    root = make_workspace(tmp, patches=PATCHES)
    user_head = git(root, "rev-parse", "main")
    proposer = Recording(tmp / "patches")
    state = ResearchLoop(root, RunOptions(tag="night"), proposer=proposer).run_loop()
    journal = Journal.for_workspace(root)
    run = journal.find_run("night")
    rows = journal.experiments(run.id)
    heldout = journal.heldout(run.id)
    journal.close()
    return {
        "root": root,
        "state": state,
        "rows": rows,
        "proposer": proposer,
        "user_head": user_head,
        "heldout": heldout,
        "tmp": tmp,
    }


def _by_description(rows):
    return {r.description: r for r in rows if r.kind == "candidate"}


def test_full_replay_run_decisions(finished_run):
    rows = finished_run["rows"]
    assert [r.number for r in rows] == list(range(1, 11))
    assert [r.kind for r in rows[:3]] == ["baseline"] * 3
    assert len({r.metric_runs[0] for r in rows[:3]}) == 3  # baselines use other seeds
    got = {d: r.decision for d, r in _by_description(rows).items()}
    assert got == {
        "nudge momentum": "keep",
        "lower the LR": "keep",
        "change the seed": "discard",
        "silence the evaluation noise": "invalid",
        "crash": "crash",
        "nan knob": "crash",
        "print a fake metric": "discard",
    }
    assert finished_run["state"].stop_reason == "the proposer has nothing more to try"


def test_small_gain_is_confirmed_with_other_seeds(finished_run):
    row = _by_description(finished_run["rows"])["nudge momentum"]
    runs = row.metric_runs
    assert len(runs) >= 2 and len(set(runs)) == len(runs)  # each re-run with another seed
    assert row.metric == pytest.approx(sum(runs) / len(runs))
    assert row.reason.startswith(f"confirmed by {len(runs) - 1} re-run(s)")
    timings = row.timings
    assert {f"train (confirm {n})" for n in range(1, len(runs))} <= set(timings)
    assert 2 < row.sigmas < 5 and 0.5 < row.probability < 1


def test_seed_change_and_fake_metric_are_not_gains(finished_run):
    rows = _by_description(finished_run["rows"])
    seed = rows["change the seed"]
    assert "within the noise" in seed.reason and seed.margin <= 2 * seed.noise
    fake = rows["print a fake metric"]
    assert fake.metric > 1.0  # the printed `loss: 0.0` and the unsigned record were ignored
    # same code as "lower the LR" plus a print: its one run scores as that commit's first run did
    assert fake.metric_runs == pytest.approx(rows["lower the LR"].metric_runs[:1])


def test_invalid_and_crashes_say_why(finished_run):
    rows = _by_description(finished_run["rows"])
    invalid = rows["silence the evaluation noise"]
    assert "evaluate.py is not editable" in invalid.reason and invalid.commit_sha is None
    crash = rows["crash"]
    assert crash.exit_code == 3 and "exited with code 3" in crash.reason
    assert "loss is nan" in rows["nan knob"].reason
    proposer = finished_run["proposer"]
    after_invalid = proposer.contexts[4]
    assert after_invalid.last_invalid_reason == invalid.reason
    assert proposer.contexts[5].last_invalid_reason is None
    assert [o.decision for o in proposer.outcomes] == [
        "keep",
        "keep",
        "discard",
        "invalid",
        "crash",
        "crash",
        "discard",
    ]
    assert after_invalid.best_metric == pytest.approx(rows["lower the LR"].metric)
    assert "LEARNING_RATE = 0.05" in after_invalid.files["train.py"]


def test_git_state_after_the_run(finished_run):
    root, rows = finished_run["root"], _by_description(finished_run["rows"])
    assert git(root, "rev-parse", "main") == finished_run["user_head"]  # the user's branch never moves
    assert git(root, "rev-parse", "--abbrev-ref", "HEAD") == "nightlab/night"
    assert git(root, "rev-parse", "HEAD") == rows["lower the LR"].commit_sha
    log = git(root, "log", "--format=%s", "main..HEAD").splitlines()
    assert log == ["nightlab #5: lower the LR", "nightlab #4: nudge momentum"]
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""
    assert not (root / "run").exists()
    assert "LEARNING_RATE = 0.05" in (root / "train.py").read_text()


def test_heldout_scores_baseline_and_best(finished_run):
    heldout = {h.label: h for h in finished_run["heldout"]}
    assert set(heldout) == {"baseline", "best"}
    assert heldout["best"].test < heldout["baseline"].test
    assert heldout["best"].commit_sha == finished_run["state"].best_commit
    assert [(h.sandboxed, h.sandbox_reason) for h in heldout.values()] == [
        (0, 'unsandboxed: [sandbox] mode = "off"')
    ] * 2


def test_report_and_results_tsv(finished_run):
    files = build_report(finished_run["root"], "night")
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, *lines = files.tsv.read_text().splitlines()
    assert header.split("\t") == ["commit", "loss", "memory_gb", "status", "description"]
    assert [line.split("\t")[3] for line in lines].count("keep") == 5  # 3 baselines + 2 kept
    text = files.report.read_text()
    assert "## Kept changes" in text and "nudge momentum" in text and "(confirmed)" in text
    assert "Validation vs held-out test" in text and "carried over" in text
    assert "| | commit | validation | test | sandbox |" in text and text.count(" | **off** |") == 2


def test_resuming_a_finished_run_runs_nothing_twice(finished_run):
    root = finished_run["root"]
    again = Recording(finished_run["tmp"] / "patches")
    state = ResearchLoop(root, RunOptions(tag="night"), proposer=again).run_loop()
    assert state.experiments == 7 and state.stop_reason == "the proposer has nothing more to try"
    journal = Journal.for_workspace(root)
    assert len(journal.experiments(journal.find_run("night").id)) == 10
    assert len(journal.heldout(1)) == 2  # each commit is scored once
    journal.close()


def test_tampering_is_detected_on_the_next_start(finished_run):
    root = finished_run["root"]
    db = sqlite3.connect(root / ".nightlab" / "journal.sqlite")
    db.execute("UPDATE experiments SET decision = 'keep' WHERE number = 6")
    db.commit()
    db.close()
    with pytest.raises(
        ChainError, match="experiments row id=6 \\(run 1, experiment 6\\): its content was modified"
    ):
        ResearchLoop(
            root, RunOptions(tag="night"), proposer=Recording(finished_run["tmp"] / "patches")
        ).run_loop()
