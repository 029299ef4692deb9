"""The loop with the bubblewrap sandbox on: experiments cannot write the harness, rows say sandboxed."""

from __future__ import annotations

import pytest

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.sandbox import detect
from tests.research.loop_workspace import make_workspace, replace_block

pytestmark = pytest.mark.skipif(not detect().available, reason=f"no usable sandbox: {detect().reason}")

TAMPER = """def main() -> None:
    Path("evaluate.py").write_text("print('loss: 0')")"""


def test_sandboxed_run_blocks_harness_writes(tmp_path):
    root = make_workspace(
        tmp_path,
        config={
            "sandbox": {"mode": "required"},
            "decide": {"baseline_runs": 2},
            "experiment": {"heldout": None},
        },
        patches={
            "1.md": replace_block("def main() -> None:", TAMPER, description="rewrite the evaluator"),
            "2.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR"),
        },
    )
    harness = (root / "evaluate.py").read_text()
    state = ResearchLoop(root, RunOptions(tag="jail", proposer="replay")).run_loop()
    assert state.sandboxed and "bubblewrap" in state.sandbox_reason
    journal = Journal.for_workspace(root)
    rows = journal.experiments(1)
    journal.close()
    assert all(r.sandboxed == 1 for r in rows)
    tamper, good = rows[-2], rows[-1]
    assert tamper.decision == "crash" and "Read-only file system" in tamper.reason
    assert good.decision == "keep"
    assert (root / "evaluate.py").read_text() == harness
