"""Experiments that hang, overrun their budget or print garbage: each gets its own decision and reason."""

from __future__ import annotations

import psutil
import pytest

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from tests.research.loop_workspace import git, make_workspace, replace_block

# The log channel: train.py prints its own `loss:` line (computed with the harness's function).
TRAIN = '''import os

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
'''

HANG = '''def main():
    import pathlib, subprocess, time
    child = subprocess.Popen(["sleep", "300"])
    pathlib.Path(os.environ["CHILD_PID_FILE"]).write_text(str(child.pid))
    time.sleep(300)'''

PRINT = '''    print(f"loss: {loss(knobs, seed, 'val')}")'''


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    pid_file = tmp / "child.pid"
    root = make_workspace(
        tmp,
        config={
            "experiment": {
                "command": "python train.py", "evaluate": None, "heldout": None, "budget_seconds": 1.0,
                "budget_tolerance": 0.0, "startup_allowance_seconds": 1.5, "timeout_seconds": 5.0,
                "env": {"CHILD_PID_FILE": str(pid_file)},
            },
            "metric": {"channel": "log"},
        },
        files={"train.py": TRAIN},
        patches={
            "1-hang.md": replace_block("def main():", HANG, description="hang"),
            "2-slow.md": replace_block("def main():", "def main():\n    import time; time.sleep(3)",
                                       description="too slow"),
            "3-garbage.md": replace_block(PRINT, '    print("loss: banana")', description="garbage"),
            "4-nan.md": replace_block(PRINT, '    print("loss: nan")', description="nan"),
            "5-silent.md": replace_block(PRINT, "    pass", description="silent"),
        },
    )
    state = ResearchLoop(root, RunOptions(tag="t", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    rows = {r["description"]: r for r in journal.experiments(1) if r["kind"] == "candidate"}
    journal.close()
    return {"root": root, "rows": rows, "pid_file": pid_file, "state": state}


def test_hanging_experiment_is_killed_with_its_children(failures):
    row = failures["rows"]["hang"]
    assert row["decision"] == "timeout" and "experiment.timeout_seconds" in row["reason"]
    child = int(failures["pid_file"].read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_budget_overrun_is_never_kept(failures):
    row = failures["rows"]["too slow"]
    assert row["decision"] == "overrun"
    assert "over the limit 2.5s" in row["reason"] and row["metric"] is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [("garbage", "'banana' is not a number"), ("nan", "loss is nan (not finite)"),
     ("silent", "no `loss: <number>` line")],
)
def test_bad_metric_output_is_a_crash_with_a_reason(failures, name, reason):
    row = failures["rows"][name]
    assert row["decision"] == "crash" and reason in row["reason"] and row["exit_code"] == 0


def test_workspace_is_back_at_the_baseline(failures):
    root = failures["root"]
    assert git(root, "rev-parse", "HEAD") == git(root, "rev-parse", "main")
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""
    assert failures["state"].keeps == 0 and failures["state"].experiments == 5
