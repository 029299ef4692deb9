"""Experiments that hang, overrun their budget or print garbage: each gets its own decision and reason."""

from __future__ import annotations

import sqlite3

import psutil
import pytest

from nightlab.research.journal import ChainError, Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from tests.research.loop_workspace import git, make_workspace, replace_block

# The log channel: train.py prints its own `loss:` line (computed with the harness's function).
TRAIN = """import os

from evaluate import loss

LEARNING_RATE = 0.3
WIDTH = 4
MOMENTUM = 0.5
SEED = 42


def main():
    seed = SEED + int(os.environ.get("NIGHTLAB_SEED_OFFSET", "0"))
    knobs = {"LEARNING_RATE": LEARNING_RATE, "WIDTH": WIDTH, "MOMENTUM": MOMENTUM}
    print(f"loss: {loss(knobs, seed, 'val')}")


if __name__ == "__main__":
    main()
"""

HANG = """def main():
    import pathlib, subprocess, time
    child = subprocess.Popen(["sleep", "300"])
    pathlib.Path(os.environ["CHILD_PID_FILE"]).write_text(str(child.pid))
    time.sleep(300)"""

PRINT = """    print(f"loss: {loss(knobs, seed, 'val')}")"""


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    pid_file = tmp / "child.pid"
    root = make_workspace(
        tmp,
        config={
            "experiment": {
                "command": "python train.py",
                "evaluate": None,
                "heldout": None,
                "budget_seconds": 1.0,
                "budget_tolerance": 0.0,
                "startup_allowance_seconds": 1.5,
                "timeout_seconds": 5.0,
                "env": {"CHILD_PID_FILE": str(pid_file)},
            },
            "metric": {"channel": "log"},
        },
        files={"train.py": TRAIN},
        patches={
            "1-hang.md": replace_block("def main():", HANG, description="hang"),
            "2-slow.md": replace_block(
                "def main():", "def main():\n    import time; time.sleep(3)", description="too slow"
            ),
            "3-garbage.md": replace_block(PRINT, '    print("loss: banana")', description="garbage"),
            "4-nan.md": replace_block(PRINT, '    print("loss: nan")', description="nan"),
            "5-silent.md": replace_block(PRINT, "    pass", description="silent"),
        },
    )
    state = ResearchLoop(root, RunOptions(tag="t", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    rows = {r.description: r for r in journal.experiments(1) if r.kind == "candidate"}
    journal.close()
    return {"root": root, "rows": rows, "pid_file": pid_file, "state": state}


def test_hanging_experiment_is_killed_with_its_children(failures):
    row = failures["rows"]["hang"]
    assert row.decision == "timeout" and "experiment.timeout_seconds" in row.reason
    child = int(failures["pid_file"].read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_budget_overrun_is_never_kept(failures):
    row = failures["rows"]["too slow"]
    assert row.decision == "overrun"
    assert "over the limit 2.5s" in row.reason and row.metric is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("garbage", "'banana' is not a number"),
        ("nan", "loss is nan (not finite)"),
        ("silent", "no `loss: <number>` line"),
    ],
)
def test_bad_metric_output_is_a_crash_with_a_reason(failures, name, reason):
    row = failures["rows"][name]
    assert row.decision == "crash" and reason in row.reason and row.exit_code == 0


def test_workspace_is_back_at_the_baseline(failures):
    root = failures["root"]
    assert git(root, "rev-parse", "HEAD") == git(root, "rev-parse", "main")
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""
    assert failures["state"].keeps == 0 and failures["state"].experiments == 5


def test_commits_ignore_the_users_gpgsign_and_a_refused_commit_is_invalid(tmp_path):
    root = make_workspace(
        tmp_path,
        config={"workspace": {"editable": ["train.py", "extra_*.py"]}, "experiment": {"heldout": None}},
        files={".gitignore": "run/\n__pycache__/\nextra_*.py\n"},
        patches={
            "1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR"),
            "2.md": "# description: an ignored helper\nextra_helper.py\n"
            "<<<<<<< SEARCH\n=======\nX = 1\n>>>>>>> REPLACE\n",
        },
    )
    git(root, "config", "commit.gpgsign", "true")
    git(root, "config", "gpg.program", "false")  # signing would fail: nightlab's commits must not sign
    state = ResearchLoop(root, RunOptions(tag="git", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    rows = {r.description: r for r in journal.experiments(1) if r.kind == "candidate"}
    journal.close()
    assert rows["lower the LR"].decision == "keep" and state.best_commit == rows["lower the LR"].commit_sha
    ignored = rows["an ignored helper"]
    assert ignored.decision == "invalid" and ignored.commit_sha is None
    assert ignored.reason.startswith("the change could not be committed: git add -- extra_helper.py failed")
    assert "ignored by one of your .gitignore files" in ignored.reason
    assert not (root / "extra_helper.py").exists() and git(root, "status", "--porcelain") == ""
    assert state.stop_reason == "the proposer has nothing more to try"


SCORE = (
    "import sys\n\nimport evaluate\n"
    "import train  # noqa: F401  (the model code, as a real evaluator imports it)\n\n"
    "sys.exit(evaluate.main())\n"
)
STALL = 'SEED = 42\nif os.environ.get("NIGHTLAB_PHASE") == "evaluate":\n    time.sleep(60)'


def test_an_evaluation_past_the_timeout_is_a_timeout(tmp_path):
    root = make_workspace(
        tmp_path,
        config={
            "experiment": {
                "evaluate": "python score.py --split val",
                "heldout": None,
                "budget_seconds": 1.0,
                "timeout_seconds": 3.0,
            }
        },
        files={"score.py": SCORE},
        patches={"1.md": replace_block("SEED = 42", STALL, description="stall the evaluation")},
    )
    ResearchLoop(root, RunOptions(tag="slow", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    row = journal.experiments(1)[-1]
    journal.close()
    assert row.decision == "timeout" and row.reason == "evaluate killed after 3s (experiment.timeout_seconds)"


def test_report_final_shows_why_a_run_cannot_be_opened(tmp_path):
    root = make_workspace(tmp_path, patches={"1.md": replace_block("WIDTH = 4", "WIDTH = 8")})
    ResearchLoop(root, RunOptions(tag="t", proposer="replay", max_experiments=0)).run_loop()
    db = sqlite3.connect(root / ".nightlab" / "journal.sqlite")
    db.execute("UPDATE experiments SET metric = 0.0 WHERE number = 1")
    db.commit()
    db.close()
    with pytest.raises(
        ChainError, match=r"experiments row id=1 \(run 1, experiment 1\): its content was modified"
    ):
        ResearchLoop(root, RunOptions(tag="t")).final_heldout()
