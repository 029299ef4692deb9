"""One phase in a subprocess: logs, clean env, timeout of the whole process group, peak memory."""

from __future__ import annotations

import os
import sys
import time

import psutil

from nightlab.research.runner import clean_env, run_phase


def test_output_is_logged_and_env_is_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTLAB_TEST_SECRET", "leak")
    log = tmp_path / "logs" / "1.log"
    seen: list[str] = []
    result = run_phase(
        'echo "python=$(command -v python)"; echo "secret=${NIGHTLAB_TEST_SECRET:-none} mine=$MINE"; exit 3',
        phase="train",
        cwd=tmp_path,
        log_path=log,
        timeout=30,
        env=clean_env({"MINE": "yes"}),
        on_line=seen.append,
    )
    assert result.exit_code == 3 and not result.timed_out and not result.ok
    assert f"python={os.path.dirname(sys.executable)}/python" in result.output
    assert "secret=none mine=yes" in result.output
    assert seen[-1] == "secret=none mine=yes"
    text = log.read_text()
    assert "=== train:" in text and "secret=none" in text and "exit 3" in text


def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    start = time.monotonic()
    result = run_phase(
        f"sleep 300 & echo $! > {pid_file}; wait",
        phase="train",
        cwd=tmp_path,
        log_path=tmp_path / "l.log",
        timeout=1.0,
    )
    assert result.timed_out and result.exit_code is None
    assert time.monotonic() - start < 60
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_background_children_do_not_outlive_the_phase(tmp_path):
    pid_file = tmp_path / "child.pid"
    result = run_phase(
        f"(sleep 300 & echo $! > {pid_file}); echo done",
        phase="train",
        cwd=tmp_path,
        log_path=tmp_path / "l.log",
        timeout=30,
    )
    assert result.ok and "done" in result.output
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "background child still alive"
        time.sleep(0.1)


def test_peak_memory_is_measured(tmp_path):
    result = run_phase(
        'python -c "b = bytearray(150 * 2**20); import time; time.sleep(0.5)"',
        phase="train",
        cwd=tmp_path,
        log_path=tmp_path / "l.log",
        timeout=60,
    )
    assert result.ok
    assert result.peak_rss_mb >= 140
