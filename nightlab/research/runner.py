"""Run one phase of an experiment: a shell command in its own process group, timed, logged and fenced.

The command gets a clean environment (so nothing of nightlab's own process leaks in), its output is streamed
line by line to the experiment's log, and a hard timeout kills the whole process group, children included.
Output is untrusted: what nightlab keeps of it is bounded (`OutputLimits`) and what it shows is made
terminal-safe.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psutil

from nightlab.paths import CACHE_ENV, cache_dir
from nightlab.research.safe_text import terminal_safe

Wrap = Callable[[list[str]], list[str]]
LineSink = Callable[[str], None]

KILL_GRACE_SECONDS = 3.0
SAMPLE_SECONDS = 0.1
READ_BYTES = 64 * 1024
LOG_LAST_LINES = 200  # the newest lines a log that hit its limit gets when the phase ends
# Where a line ends, as Python's universal newlines read it: a progress bar's bare \r ends one too.
_NEWLINE = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class OutputLimits:
    """How much of a phase's output nightlab keeps, so that a flood or one endless line cannot take its
    memory or the disk. The output is read to its end whatever the limits: the process never blocks."""

    line_bytes: int = 64 * 1024  # a longer line keeps its start and a marker saying how much was cut
    log_bytes: int = 64 * 2**20  # per phase; past it the log stops growing (the newest lines end it)
    tail_chars: int = 4_000_000  # the newest output kept in memory, where the metric lines are read
    tail_lines: int = 100_000  # the same tail in lines: many short lines cost more than their characters


OUTPUT_LIMITS = OutputLimits()


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
    stopped: str = ""  # why nightlab stopped the phase before it ended, if it did (see `run_phase`'s `stop`)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.stopped

    def tail(self, lines: int = 8) -> str:
        """The last `lines` of the output, terminal-safe: error messages and journal reasons quote it."""
        return terminal_safe("\n".join(self.output.strip().splitlines()[-lines:]))


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


def read_line_batches(fd: int, max_bytes: int) -> Iterator[list[bytes]]:
    """The lines `fd` delivers until it closes, without their ends, in batches (those each read completed).
    A line over `max_bytes` keeps its first `max_bytes` and a marker saying how much was cut; the rest is
    read and dropped as it comes."""
    line, cut, after_cr = bytearray(), 0, False
    while chunk := os.read(fd, READ_BYTES):
        if after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the \n of a \r\n split between two reads
        after_cr = chunk.endswith(b"\r")
        *ended, rest = _NEWLINE.split(chunk)
        batch: list[bytes] = []
        for piece in ended:
            if not line and not cut and len(piece) <= max_bytes:
                batch.append(piece)  # the common case, a short line within one read
                continue
            cut += _append_capped(line, piece, max_bytes)
            batch.append(_marked(line, cut))
            line, cut = bytearray(), 0
        cut += _append_capped(line, rest, max_bytes)
        if batch:
            yield batch
    if line or cut:
        yield [_marked(line, cut)]


def _append_capped(line: bytearray, piece: bytes, max_bytes: int) -> int:
    """Append what fits of `piece` to `line`; return how many bytes did not."""
    room = max(0, max_bytes - len(line))
    line += piece[:room]
    return max(0, len(piece) - room)


def _marked(line: bytearray, cut: int) -> bytes:
    return bytes(line) + (
        f" [... {cut} more bytes of this line not kept by nightlab]".encode() if cut else b""
    )


class _Output:
    """Where a phase's lines go: the log (up to `log_bytes`), the tail in memory, and the live view, which
    gets them terminal-safe. The tail keeps the newest output, where the metric lines are. Once finished it
    takes no more lines: a process that escaped the kill may still hold the pipe."""

    def __init__(self, log: BinaryIO, limits: OutputLimits, on_line: LineSink | None) -> None:
        self.log, self.limits, self.on_line = log, limits, on_line
        self.tail: collections.deque[str] = collections.deque()
        self.tail_chars = self.logged = self.unlogged = 0
        self.finished = False
        self.lock = threading.Lock()

    def add(self, batch: list[bytes]) -> None:
        """Take the lines one read completed; the log is flushed once per batch, not once per line."""
        with self.lock:
            if self.finished:
                return
            for raw in batch:
                self._add(raw)
            self.log.flush()

    def _add(self, raw: bytes) -> None:
        self._log(raw)
        text = raw.decode("utf-8", errors="replace")
        self.tail.append(text)
        self.tail_chars += len(text)
        limits = self.limits
        while len(self.tail) > 1 and (
            len(self.tail) > limits.tail_lines or self.tail_chars > limits.tail_chars
        ):
            self.tail_chars -= len(self.tail.popleft())
        if self.on_line is not None:
            self.on_line(terminal_safe(text))

    def _log(self, raw: bytes) -> None:
        if not self.unlogged and self.logged + len(raw) + 1 <= self.limits.log_bytes:
            self.log.write(raw + b"\n")
            self.logged += len(raw) + 1
            return
        if not self.unlogged:
            self.log.write(
                f"=== nightlab: this log stops here, at its limit of {self.limits.log_bytes} bytes; the "
                "output is still read, and its last lines follow at the end\n".encode()
            )
        self.unlogged += len(raw) + 1

    def finish(self) -> str:
        """Stop taking lines, end a log that hit its limit with the newest ones (where a crash's traceback
        is), and return the tail."""
        with self.lock:
            self.finished = True
            if self.unlogged:
                last = list(self.tail)[-LOG_LAST_LINES:]
                head = (
                    f"=== nightlab: {self.unlogged} bytes of output not logged; the last {len(last)} lines:"
                )
                self.log.write("\n".join([head, *last, ""]).encode("utf-8", errors="replace"))
            return "".join(line + "\n" for line in self.tail)


def _supervise(
    proc: subprocess.Popen[bytes], start: float, timeout: float, stop: Callable[[], str] | None
) -> tuple[bool, str, resource.struct_rusage | None, int, float]:
    """Wait for `proc` (at most `timeout` seconds from `start`, and while `stop` gives no reason), sampling
    its tree's memory, then kill its group; `proc.returncode` is set. Returns (timed out, why it was stopped,
    rusage, peak RSS in bytes, wall seconds)."""
    timed_out, stopped, status, rusage, peak = False, "", 0, None, 0
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
            timed_out = time.monotonic() - start > timeout
            stopped = "" if timed_out or stop is None else stop()
            if timed_out or stopped:
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
    return timed_out, stopped, rusage, peak, wall


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
    limits: OutputLimits = OUTPUT_LIMITS,
    stop: Callable[[], str] | None = None,
) -> PhaseResult:
    """Run `bash -c command` and wait for it (at most `timeout` seconds), appending its output to `log_path`.

    `env` is the complete environment of the phase (build it with `clean_env`); `wrap` may rewrite the argv,
    e.g. to run it inside a sandbox; `on_start` gets the process group id as soon as it exists; `on_line`
    gets each line made terminal-safe, while the log and the result keep what was printed (within `limits`);
    `stop`, polled while the phase runs, ends it (its whole group) as soon as it gives a reason.
    """
    argv = ["bash", "-c", command]
    if wrap is not None:
        argv = wrap(argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"=== {phase}: {command}\n".encode())
        log.flush()
        output = _Output(log, limits, on_line)
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else clean_env({}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            bufsize=0,
        )

        def pump() -> None:
            assert proc.stdout is not None
            with proc.stdout:  # closed here, never under a read: a process that escaped may still write
                for batch in read_line_batches(proc.stdout.fileno(), limits.line_bytes):
                    output.add(batch)

        if on_start is not None:
            on_start(proc.pid)
        reader = threading.Thread(target=pump, name=f"nightlab-{phase}-log", daemon=True)
        reader.start()
        timed_out, stopped, rusage, peak, wall = _supervise(proc, start, timeout, stop)
        reader.join(timeout=5)
        exit_code = None if timed_out else proc.returncode
        verdict = "timed out" if timed_out else f"stopped: {stopped}" if stopped else f"exit {exit_code}"
        text = output.finish()
        log.write(f"=== {phase}: {verdict} after {wall:.2f}s\n".encode())
    peak_mb = max(peak, (rusage.ru_maxrss * 1024) if rusage else 0) / 2**20
    return PhaseResult(phase, exit_code, wall, peak_mb, timed_out, text, log_path, stopped)
