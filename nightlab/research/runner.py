"""Run one phase of an experiment: a shell command in its own process group, timed, logged and fenced.

The command gets a clean environment (so nothing of nightlab's own process leaks in), its output is streamed
line by line to the experiment's log, and a hard timeout kills the whole process group, children included.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from nightlab.paths import CACHE_ENV, cache_dir

Wrap = Callable[[list[str]], list[str]]
LineSink = Callable[[str], None]

KILL_GRACE_SECONDS = 3.0
SAMPLE_SECONDS = 0.1
TAIL_CHARS = 4_000_000  # output kept in memory for metric parsing; the log file keeps everything


@dataclass
class PhaseResult:
    """What happened when a phase ran."""

    phase: str
    exit_code: int | None
    wall_seconds: float
    peak_rss_mb: float
    timed_out: bool
    output: str
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def tail(self, lines: int = 8) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


def venv_bin() -> str:
    """The bin dir of the Python running nightlab, so `python` in a command is the same interpreter."""
    return sysconfig.get_path("scripts") or str(Path(sys.executable).parent)


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """A minimal environment: PATH (venv first), HOME, LANG, nightlab's cache dir, plus what the caller adds.

    The cache dir is passed explicitly because a sandboxed phase gets an empty private HOME. Python writes no
    `__pycache__` into the workspace: a phase may leave nothing outside the scratch paths."""
    path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env = {
        "PATH": f"{venv_bin()}{os.pathsep}{path}",
        "HOME": os.environ.get("HOME", str(Path.home())),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        CACHE_ENV: str(cache_dir()),
    }
    env.update(extra)
    return env


def _tree_rss(root: psutil.Process) -> int:
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the group? Zombies count for killpg but can do no harm."""
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def kill_group(pgid: int) -> None:
    """SIGTERM the whole group, give it a moment to exit cleanly, then SIGKILL what is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def run_phase(
    command: str,
    *,
    phase: str,
    cwd: Path,
    log_path: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
    wrap: Wrap | None = None,
    on_line: LineSink | None = None,
    on_start: Callable[[int], None] | None = None,
) -> PhaseResult:
    """Run `bash -c command` and wait for it (at most `timeout` seconds), appending its output to `log_path`.

    `env` is the complete environment of the phase (build it with `clean_env`); `wrap` may rewrite the argv,
    e.g. to run it inside a sandbox; `on_start` gets the process group id as soon as it exists.
    """
    argv = ["bash", "-c", command]
    if wrap is not None:
        argv = wrap(argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque()
    tail_chars = 0
    with log_path.open("a", encoding="utf-8", errors="replace") as log:
        log.write(f"=== {phase}: {command}\n")
        log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else clean_env({}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
            errors="replace",
            bufsize=1,
        )

        def pump() -> None:
            nonlocal tail_chars
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail.append(line)
                tail_chars += len(line)
                while tail_chars > TAIL_CHARS and len(tail) > 1:
                    tail_chars -= len(tail.popleft())
                if on_line is not None:
                    on_line(line.rstrip("\n"))

        if on_start is not None:
            on_start(proc.pid)
        reader = threading.Thread(target=pump, name=f"nightlab-{phase}-log", daemon=True)
        reader.start()
        timed_out, status, rusage, peak = False, 0, None, 0
        try:
            ps = psutil.Process(proc.pid)
        except psutil.Error:
            ps = None
        try:
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if ps is not None:
                    peak = max(peak, _tree_rss(ps))
                if time.monotonic() - start > timeout:
                    timed_out = True
                    kill_group(proc.pid)
                    _, status, rusage = os.wait4(proc.pid, 0)
                    break
                time.sleep(SAMPLE_SECONDS)
        finally:
            wall = time.monotonic() - start
            # Background children outlive their parent unless the group goes too (and they hold the pipe).
            kill_group(proc.pid)
            if proc.returncode is None and rusage is None:
                proc.kill()
                proc.wait()
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        exit_code = None if timed_out else proc.returncode
        verdict = "timed out" if timed_out else f"exit {exit_code}"
        log.write(f"=== {phase}: {verdict} after {wall:.2f}s\n")
    peak_mb = max(peak, (rusage.ru_maxrss * 1024) if rusage else 0) / 2**20
    return PhaseResult(phase, exit_code, wall, peak_mb, timed_out, "".join(tail), log_path)
