"""The plausibility guard: a result far past what the noise allows is never kept on its word.

Three planted results on the quadratic toy, whose baseline loss is about 12.5 with a noise of 0.01:
- a change whose first run reports an absurd value once (the optimum, about 1250 noise in one step), and
  the honest value on every other seed: enough baseline runs make such a first run a "clear gain" that the
  plain rule keeps without a re-run;
- a change that finds a hole in the harness (a field of run/model.json it trusts) and reports a loss below
  anything the metric can honestly reach, every time;
- a real change of hundreds of noise units (the right learning rate), which holds up when re-verified.
The first two are quarantined and never kept; the third is kept after the extra re-verification, and both
the report and the live view flag it.
"""

from __future__ import annotations

from io import StringIO

import pytest
from rich.console import Console
from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.config import DecideSection
from nightlab.research.journal import Journal
from nightlab.research.live import LiveView, PlainView
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.state import LoopState
from tests.research.loop_workspace import make_workspace, replace_block

# The quadratic harness with a hole: it trusts a "calibration" the model file may carry.
TRUSTING_EVALUATE = '''"""The quadratic loss of run/model.json, minus the calibration the file declares."""

import json
import sys
from pathlib import Path

from nightlab.harness import read_key, reexec_without_key, sign_metrics

OPTIMUM = {"LEARNING_RATE": 0.05, "WIDTH": 16.0, "MOMENTUM": 0.9}
SCALE = {"LEARNING_RATE": 0.1, "WIDTH": 8.0, "MOMENTUM": 0.2}


def loss(knobs, seed, split="val"):
    import random

    bowl = sum(((float(knobs[k]) - OPTIMUM[k]) / SCALE[k]) ** 2 for k in OPTIMUM)
    return bowl + 0.01 * random.Random(seed + (1_000_003 if split == "test" else 0)).gauss(0, 1)


def main():
    reexec_without_key()
    key = read_key()
    model = json.loads(Path("run/model.json").read_text())
    value = loss(model["knobs"], int(model["seed"])) - float(model.get("calibration", 0.0))
    print(sign_metrics({"loss": value}, key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''
KNOBS = '    knobs = {"LEARNING_RATE": LEARNING_RATE, "WIDTH": WIDTH, "MOMENTUM": MOMENTUM}'
ONCE = replace_block(
    KNOBS,
    KNOBS + '\n    if os.environ.get("NIGHTLAB_SEED_OFFSET") == "0":\n'
    '        knobs = {"LEARNING_RATE": 0.05, "WIDTH": 16, "MOMENTUM": 0.9}',
    description="an absurd value, once",
)
WRITE = '    (out / "model.json").write_text(json.dumps({"knobs": knobs, "seed": seed}))'
HOLE = replace_block(
    WRITE,
    WRITE.replace('"seed": seed}', '"seed": seed, "calibration": 100.0}'),
    description="calibrate the loss",
)
REAL = replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR")
# Enough baseline runs (5 degrees of freedom) that the plain rule keeps a huge first run without a re-run.
DECIDE = {"baseline_runs": 6, "best_possible": -0.1}


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plausibility")
    root = make_workspace(
        tmp,
        config={"experiment": {"heldout": None}, "decide": DECIDE},
        files={"evaluate.py": TRUSTING_EVALUATE},
        patches={"1.md": ONCE, "2.md": HOLE, "3.md": REAL},
    )
    state = ResearchLoop(root, RunOptions(tag="guard", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("guard").id)
    journal.close()
    return root, state, {r.description: r for r in rows}


def test_an_absurd_value_once_is_quarantined_after_re_verification(guarded_run):
    _, state, rows = guarded_run
    once = rows["an absurd value, once"]
    assert once.metric_runs[0] < 0.1 and once.decision == "quarantine"
    assert once.quarantine.startswith("the first run is ") and "noise better than the best" in once.quarantine
    # Re-verified beside the best: the first re-run shows the honest value, and the verification stops there.
    assert len(once.metric_runs) == 2 and once.metric_runs[1] > 12 and len(once.best_reruns) == 1
    assert once.reason.startswith("quarantined: the first run is ") and "but re-run 1 gained" in once.reason
    assert state.best_commit != once.commit_sha


def test_a_value_past_what_the_metric_can_reach_is_never_kept(guarded_run):
    _, state, rows = guarded_run
    hole = rows["calibrate the loss"]
    assert hole.metric < -80 and hole.decision == "quarantine" and len(hole.metric_runs) == 1
    assert "decide.best_possible" in hole.quarantine and "-0.1" in hole.quarantine
    assert state.best_commit != hole.commit_sha


def test_a_real_but_implausible_gain_is_kept_after_re_verification_and_flagged(guarded_run, tmp_path):
    root, state, rows = guarded_run
    real = rows["lower the LR"]
    assert real.decision == "keep" and state.best_commit == real.commit_sha
    assert real.quarantine and len(real.metric_runs) == 1 + DecideSection().quarantine_runs
    assert real.reason.startswith(f"confirmed by {DecideSection().quarantine_runs} re-run(s)")
    result = CliRunner().invoke(app, ["report", "-C", str(root), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "## Quarantined and implausible results" in text
    hole = rows["calibrate the loss"]
    assert f"| {real.number} | keep |" in text and f"| {hole.number} | quarantine |" in text
    assert "Decisions: " in text and "quarantine 2" in text
    console = Console(file=StringIO(), width=300)
    PlainView(console).experiment_finished(real, LoopState(metric_name="loss"))
    assert "implausible gain, kept after re-verification" in console.file.getvalue()
    live = LiveView(Console(file=StringIO(), width=300))
    live._state = state  # the panel counts the quarantined results for as long as the run goes on
    live.console.print(live.__rich__())
    assert "2 result(s) quarantined" in live.console.file.getvalue()
