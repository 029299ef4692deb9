"""kill -9 of `nightlab run` in the middle of an experiment, then resume: nothing lost, nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
from optuna.distributions import IntDistribution

from nightlab.research.journal import Experiment, Journal, Pending
from nightlab.research.loop import ResearchLoop, RunOptions
from tests.research.loop_workspace import commit_all, git, make_workspace, replace_block


def _rows(root):
    journal = Journal.for_workspace(root)
    try:
        return journal.experiments(1)
    finally:
        journal.close()


SLOW = """def main() -> None:
    from pathlib import Path
    Path(os.environ["STARTED_FILE"]).write_text(str(os.getpid()))
    time.sleep(120)"""


def _nightlab(root, *args, **kw):
    cmd = [sys.executable, "-m", "nightlab.cli", "run", "--tag", "night", "--proposer", "replay", *args]
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(path, seconds=120):
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return int(path.read_text())


def test_kill_then_resume(tmp_path):
    started = tmp_path / "started"
    root = make_workspace(
        tmp_path,
        config={
            "experiment": {
                "budget_seconds": 200,
                "timeout_seconds": 300,
                "heldout": None,
                "env": {"STARTED_FILE": str(started)},
            }
        },
        patches={
            "1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR"),
            "2.md": replace_block("def main() -> None:", SLOW, description="slow"),
            "3.md": replace_block("WIDTH = 4", "WIDTH = 16", description="wider"),
        },
    )
    first = _nightlab(root)
    orphan = _wait_for(started)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert psutil.pid_exists(orphan)  # the experiment outlived nightlab (its own session)
    journal = Journal.for_workspace(root)
    assert [p.number for p in journal.pending(1)] == [5]
    journal.close()
    assert "time.sleep(120)" in (root / "train.py").read_text()  # killed with the slow change checked out

    second = _nightlab(root)
    out, _ = second.communicate(timeout=240)
    assert second.returncode == 0, out
    assert "#5 was interrupted" in out or "experiment #5 was interrupted" in out
    deadline = time.monotonic() + 10
    while psutil.pid_exists(orphan) and psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the orphaned experiment of the killed run is still running"
        time.sleep(0.1)

    journal = Journal.for_workspace(root)
    rows = journal.experiments(1)
    journal.verify_chain()
    assert journal.pending(1) == []
    journal.close()
    assert [r.number for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [(r.description, r.decision) for r in rows[3:]] == [
        ("lower the LR", "keep"),
        ("slow", "crash"),
        ("wider", "keep"),
    ]
    assert rows[4].reason.startswith("interrupted")
    assert rows[5].parent_commit == rows[3].commit_sha  # built on the last kept commit, not the slow one
    assert git(root, "rev-parse", "HEAD") == rows[5].commit_sha
    assert git(root, "log", "--format=%s", "main..HEAD").splitlines() == [
        "nightlab #6: wider",
        "nightlab #4: lower the LR",
    ]
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""
    assert "time.sleep(120)" not in (root / "train.py").read_text()


def test_the_proposer_is_built_on_the_repaired_workspace(tmp_path):
    """After a kill, train.py may still hold the interrupted candidate; tune's ranges must centre on the
    best."""
    root = make_workspace(
        tmp_path,
        config={"experiment": {"heldout": None}, "proposer.tune": {"knobs": None}},
        patches={"1.md": replace_block("WIDTH = 4", "WIDTH = 5")},
    )
    ResearchLoop(root, RunOptions(tag="night", proposer="replay", max_experiments=0)).run_loop()
    # What kill -9 in the middle of experiment 4 leaves: its commit checked out, its marker pending.
    best = git(root, "rev-parse", "HEAD")
    (root / "train.py").write_text((root / "train.py").read_text().replace("WIDTH = 4", "WIDTH = 64"))
    commit_all(root, "nightlab #4: much wider")
    journal = Journal.for_workspace(root)
    started = Experiment(
        1,
        4,
        "candidate",
        parent_commit=best,
        commit_sha=git(root, "rev-parse", "HEAD"),
        description="much wider",
        proposer="tune",
    )
    journal.mark_pending(Pending(started))
    journal.close()
    loop = ResearchLoop(root, RunOptions(tag="night", proposer="tune", max_experiments=2))
    loop.run_loop()
    assert loop.proposer.space["WIDTH"] == IntDistribution(2, 8)  # around WIDTH = 4, not 64
    rows = _rows(root)
    assert [r.number for r in rows[3:]] == [4, 5] and rows[3].reason.startswith("interrupted")
    assert rows[4].proposer == "tune" and rows[4].parent_commit == best
    assert "WIDTH = 64" not in (root / "train.py").read_text()
