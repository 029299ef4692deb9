"""`nightlab run --workers N`: candidates at once on a local Ray cluster, each in its own worktree, decided by
the driver alone: a keep whose best moved is rebased and run again, or recorded stale; kill -9 of the driver
or of a worker loses nothing and runs nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nightlab.research import sandbox
from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.worktrees import run_dir
from tests.research.loop_workspace import git, make_workspace, replace_block

pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)


def _slow(seconds: float, marker: str = "") -> str:
    """The start of train.py's main, sleeping first (and writing its pid to $STARTED_DIR/marker)."""
    note = f'    Path(os.environ["STARTED_DIR"], "{marker}").write_text(str(os.getpid()))\n' if marker else ""
    return f"def main() -> None:\n{note}    time.sleep({seconds})"


def _rows(root: Path) -> list:
    journal = Journal.for_workspace(root)
    try:
        return journal.experiments(1)
    finally:
        journal.close()


def _config(**experiment: object) -> dict:
    return {
        "experiment": {"heldout": None, "budget_seconds": 8, "timeout_seconds": 120, **experiment},
        "decide": {"confirm": False, "implausible_sigmas": 1e6},
        "parallel": {"cpus_per_experiment": 0.5},
    }


def test_three_at_once_keep_rebase_and_stale(tmp_path):
    config = _config()
    if sandbox.detect().available:
        config["sandbox"] = {"mode": "required"}  # the workers' worktrees jailed like the workspace
    root = make_workspace(
        tmp_path,
        config=config,
        patches={
            "1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR"),
            "2.md": replace_block("WIDTH = 4", "WIDTH = 16", description="wider")
            + replace_block("def main() -> None:", _slow(3)),
            "3.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.1", description="LR to 0.1")
            + replace_block("def main() -> None:", _slow(3)),
        },
    )
    state = ResearchLoop(root, RunOptions(tag="night", proposer="replay", workers=3)).run_loop()

    rows = _rows(root)
    assert [r.number for r in rows] == list(range(1, 7))  # 3 baseline runs, then each candidate once
    by = {r.description: r for r in rows if r.kind == "candidate"}
    lr, wider, other = by["lower the LR"], by["wider"], by["LR to 0.1"]
    assert lr.decision == "keep" and lr.parent_commit == rows[0].commit_sha
    # "wider" passed on the baseline while the LR change was kept: rebased onto it and run again there.
    assert wider.decision == "keep", wider.reason
    assert "rebased onto" in wider.reason and wider.parent_commit == lr.commit_sha
    assert "-WIDTH = 4" in wider.diff and "-LEARNING_RATE" not in wider.diff
    # "LR to 0.1" passed on the baseline too, but its change no longer applies on top of the new best.
    assert other.decision == "stale" and "does not apply" in other.reason, other.reason
    assert other.metric is not None and other.metric < rows[0].metric
    # They ran at once: the slow two overlapped in time.
    assert wider.started_at < other.finished_at and other.started_at < wider.finished_at
    assert state.best_commit == wider.commit_sha == git(root, "rev-parse", "HEAD")
    text = (root / "train.py").read_text()
    assert "LEARNING_RATE = 0.05" in text and "WIDTH = 16" in text
    assert not run_dir(root, "night").exists()
    assert len(git(root, "worktree", "list").splitlines()) == 1
    assert (root / ".nightlab" / "logs" / "night" / f"{other.number:04d}.log").is_file()


def test_a_repeat_of_a_running_candidate_is_not_run(tmp_path):
    wider = replace_block("WIDTH = 4", "WIDTH = 16", description="wider")
    root = make_workspace(
        tmp_path,
        config=_config(),
        patches={
            "1.md": wider + replace_block("def main() -> None:", _slow(3)),
            "2.md": replace_block("WIDTH = 4", "WIDTH = 16  # the same again", description="wider again")
            + replace_block("def main() -> None:", _slow(3) + "  # slept"),
        },
    )
    ResearchLoop(root, RunOptions(tag="night", proposer="replay", workers=2)).run_loop()
    first, again = _rows(root)[3:]
    assert first.decision == "keep" and again.decision == "duplicate"
    assert f"duplicate of #{first.number} (wider)" in again.reason and "running now" in again.reason


def _nightlab(root: Path, *args: str) -> subprocess.Popen:
    """`nightlab run` in the background, its output in a file beside the workspace (`_output`): a pipe
    nobody reads while the test waits could fill and stall it."""
    cmd = [sys.executable, "-m", "nightlab.cli", "run", "--tag", "night", "--proposer", "replay", *args]
    log = (root.parent / "nightlab.out").open("a")
    return subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, text=True)


def _output(root: Path) -> str:
    return (root.parent / "nightlab.out").read_text()


def _pid_in(path: Path, seconds: float = 180, output: Path | None = None) -> int:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        said = _output(output) if output else ""
        assert time.monotonic() < deadline, f"{path} never appeared; nightlab said:\n{said}"
        time.sleep(0.2)
    return int(path.read_text())


def _gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_kill_9_of_the_driver_then_resume(tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    root = make_workspace(
        tmp_path,
        config=_config(env={"STARTED_DIR": str(started)}),
        patches={
            "1.md": replace_block("def main() -> None:", _slow(100, "a"), description="slow a"),
            "2.md": replace_block("def main() -> None:", _slow(100, "b"), description="slow b"),
            "3.md": replace_block("WIDTH = 4", "WIDTH = 16", description="wider"),
        },
    )
    first = _nightlab(root, "--workers", "2")
    orphans = [_pid_in(started / "a", output=root), _pid_in(started / "b", output=root)]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    journal = Journal.for_workspace(root)
    assert [p.number for p in journal.pending(1)] == [4, 5]
    journal.close()

    second = _nightlab(root, "--workers", "2")
    assert second.wait(timeout=300) == 0, _output(root)
    assert all(_gone(pid) for pid in orphans), "the killed run's experiments are still running"
    rows = _rows(root)
    assert [r.number for r in rows] == list(range(1, 7))  # nothing lost, nothing twice
    assert [(r.description, r.decision) for r in rows[3:]] == [
        ("slow a", "crash"),
        ("slow b", "crash"),
        ("wider", "keep"),
    ]
    assert all("interrupted" in r.reason for r in rows[3:5])
    assert not run_dir(root, "night").exists()
    assert len(git(root, "worktree", "list").splitlines()) == 1


def test_kill_9_of_a_worker_costs_its_candidate_only(tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    root = make_workspace(
        tmp_path,
        config=_config(env={"STARTED_DIR": str(started)}),
        patches={
            "1.md": replace_block("def main() -> None:", _slow(100, "a"), description="slow a"),
            "2.md": replace_block("WIDTH = 4", "WIDTH = 16", description="wider")
            + replace_block("def main() -> None:", _slow(2)),
            "3.md": replace_block("MOMENTUM = 0.5", "MOMENTUM = 0.9", description="more momentum"),
        },
    )
    run = _nightlab(root, "--workers", "2")
    phase = _pid_in(started / "a", output=root)
    worker = psutil.Process(phase).parent()
    assert "ExperimentWorker" in " ".join(worker.cmdline())
    worker.kill()
    assert run.wait(timeout=300) == 0, _output(root)
    assert _gone(phase), "the dead worker's experiment is still running"
    rows = _rows(root)
    assert [r.number for r in rows] == list(range(1, 7))
    decisions = {r.description: r for r in rows[3:]}
    assert decisions["slow a"].decision == "crash"
    assert "worker running it died" in decisions["slow a"].reason
    assert decisions["wider"].decision == "keep" and decisions["more momentum"].decision == "keep"
    assert not run_dir(root, "night").exists()
