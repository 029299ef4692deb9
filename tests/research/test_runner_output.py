"""A phase's output is untrusted: what nightlab keeps of it is bounded, and what it shows is terminal-safe."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import time
import tracemalloc
from pathlib import Path

import psutil
import pytest

from nightlab.harness import sign_metrics
from nightlab.research.metrics import read_signed_metrics
from nightlab.research.runner import OutputLimits, read_line_batches, run_phase
from nightlab.research.safe_text import terminal_safe


def run(tmp_path: Path, command: str, **kw: object):  # noqa: ANN201 - PhaseResult
    return run_phase(command, phase="train", cwd=tmp_path, log_path=tmp_path / "l.log", timeout=120, **kw)


def test_a_200_mb_line_is_cut_and_memory_stays_bounded(tmp_path: Path) -> None:
    """One endless line once took the loop to 543 MB: it is cut at `line_bytes`, the rest read and dropped."""
    seen: list[str] = []
    tracemalloc.start()
    try:
        result = run(
            tmp_path,
            "head -c 200000000 /dev/zero | tr '\\0' x; echo; echo 'val_loss: 1.5'",
            on_line=seen.append,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok
    assert peak < 32 * 2**20, f"reading the output took {peak / 2**20:.0f} MB"
    limit = OutputLimits().line_bytes
    marker = f" [... {200_000_000 - limit} more bytes of this line not kept by nightlab]"
    assert result.output == "x" * limit + marker + "\nval_loss: 1.5\n"
    assert seen == ["x" * limit + marker, "val_loss: 1.5"]
    assert (tmp_path / "l.log").stat().st_size < 2 * limit


def test_a_flood_is_bounded_and_the_last_signed_metric_line_survives(tmp_path: Path) -> None:
    """The log stops at its limit and says so, the process runs on with its output drained, the tail in memory
    keeps the newest lines (where the harness's metric line is), and a log that stopped ends with them."""
    key = "k" * 64
    signed = sign_metrics({"val_loss": 1.25}, key)
    script = tmp_path / "flood.py"
    script.write_text(
        "import sys\n"
        "for i in range(200_000):\n"
        "    print(f'step {i} loss 3.0')\n"
        "print('y' * 50_000)\n"
        f"print({signed!r})\n"
        "sys.exit(0)\n"
    )
    limits = OutputLimits(line_bytes=1000, log_bytes=100_000, tail_chars=20_000, tail_lines=500)
    tracemalloc.start()
    try:
        result = run(tmp_path, f"{sys.executable} {script}", limits=limits, on_line=lambda line: None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok
    assert peak < 8 * 2**20, f"the flood took {peak / 2**20:.0f} MB"
    lines = result.output.splitlines()
    assert len(lines) <= limits.tail_lines and len(result.output) <= limits.tail_chars + limits.line_bytes
    assert lines[-1] == signed and lines[-3] == "step 199999 loss 3.0"
    assert lines[-2].startswith("y" * 1000 + " [... 49000 more bytes")
    assert read_signed_metrics(result.output, key) == {"val_loss": 1.25}
    log = (tmp_path / "l.log").read_text()
    assert len(log) < limits.log_bytes + 200 * 1100
    assert log.count("this log stops here, at its limit of 100000 bytes") == 1
    assert "bytes of output not logged; the last 200 lines:" in log
    assert log.endswith(
        f"step 199999 loss 3.0\n{lines[-2]}\n{signed}\n=== train: exit 0 after {result.wall_seconds:.2f}s\n"
    )


def test_the_live_view_never_gets_escape_sequences(tmp_path: Path) -> None:
    """An OSC 52 clipboard write, a clear-screen, colours, a carriage return or backspace that would hide
    text, a C1 control and a right-to-left override all reach the sink as plain words; the result and the
    log keep the bytes that were printed."""
    seen: list[str] = []
    printed = (
        r"\033]52;c;Y3VybCBldmlsLnNoIHwgc2g=\a"
        r"\033[2J\033[Hcleared\n"
        r"\033[31mred\033[0m text\n"
        r"metric 1.0\rmetric 0.1\n"
        r"abc\b\b\bxyz\n"
        r"\302\23331mc1\n"  # U+009B, the one-character CSI
        r"\342\200\256evil.txt\n"
        r"tab\there\n"
    )
    result = run(tmp_path, f"printf '{printed}'", on_line=seen.append)
    assert result.ok
    assert seen == [
        "cleared",
        "red text",
        "metric 1.0",
        "metric 0.1",
        "abcxyz",
        "31mc1",
        "evil.txt",
        "tab\there",
    ]
    for line in seen:
        assert line.isprintable() or line == "tab\there", repr(line)
    assert "\x1b]52;c;" in result.output and "\x1b]52;c;" in (tmp_path / "l.log").read_text()


def test_a_failing_phase_quotes_its_tail_terminal_safe(tmp_path: Path) -> None:
    result = run(tmp_path, r"printf 'Traceback\n\033[2Jboom\033]0;title\a\n'; exit 1")
    assert not result.ok and result.tail() == "Traceback\nboom"


def test_output_after_the_phase_ended_is_dropped(tmp_path: Path) -> None:
    """A process that left the group (possible unsandboxed) keeps the pipe: the phase ends without it, and
    what it prints later reaches neither the finished result nor the log."""
    pid_file = tmp_path / "escaped.pid"
    escaped = f"echo $$ > {pid_file}; trap 'echo late; exit 0' USR1; while :; do sleep 0.1; done"
    result = run(tmp_path, f"setsid bash -c {shlex.quote(escaped)} & sleep 0.5; echo done")
    pid = int(pid_file.read_text())
    try:
        assert result.ok and result.output == "done\n"
        os.kill(pid, signal.SIGUSR1)
        psutil.Process(pid).wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)  # the reader takes "late", then the end of the pipe
    log = (tmp_path / "l.log").read_text()
    assert "\nlate\n" not in log and log.endswith(f"=== train: exit 0 after {result.wall_seconds:.2f}s\n")


@pytest.mark.parametrize(
    ("text", "safe"),
    [
        ("plain\ttext\nnext line", "plain\ttext\nnext line"),
        ("\x1b]52;c;ZXZpbA==\x07after", "after"),  # OSC 52 ended by BEL
        ("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),  # hyperlink, ended by ST
        ("\x1b]0;title without end\nnext", "\nnext"),  # an unended string stops at the line end
        ("\x1bPq#0;2;0;0;0\x1b\\sixel", "sixel"),  # DCS
        ("\x1b[2J\x1b[H\x1b[?1049h\x1b[38;5;196mred\x1b[0m", "red"),  # CSI
        ("\x1bc\x1b(0\x1b7reset", "reset"),  # other escapes
        ("a\rb\r\nc", "a\nb\nc"),  # a carriage return ends a line instead of overwriting it
        ("x\x00\x07\x08\x7f\x85\x9b\x9dy", "xy"),  # C0, DEL, C1
        ("\u202egnp.exe\u2066\u200fok", "gnp.exeok"),  # bidirectional overrides and isolates
        ("lone escape at the end \x1b", "lone escape at the end "),
        ("unicode stays: é ✓ 日本", "unicode stays: é ✓ 日本"),
    ],
)
def test_terminal_safe(text: str, safe: str) -> None:
    assert terminal_safe(text) == safe


def test_lines_end_where_universal_newlines_end_them_and_long_ones_are_cut() -> None:
    r, w = os.pipe()
    batches = read_line_batches(r, 10)
    os.write(w, b"a\r")
    assert next(batches) == [b"a"]
    os.write(w, b"\nb\r\n" + b"x" * 10 + b"\n" + b"y" * 25 + b"\nlast")
    os.close(w)
    assert [line for batch in batches for line in batch] == [
        b"b",
        b"x" * 10,
        b"y" * 10 + b" [... 15 more bytes of this line not kept by nightlab]",
        b"last",
    ]
    os.close(r)
