"""How much time the research loop adds around each experiment.

Runs the loop (replay proposer, sandbox off) over N experiments whose command takes a fixed time, then
prints the per-experiment overhead (wall time of the experiment minus the command's wall time) and that as a
share of a 60 s budget. Goal: under 2% of 60 s.

    .venv/bin/python benchmarks/loop_overhead.py [--experiments 20] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.workspace import init_workspace

TRAIN = '''import os
import time

from evaluate import loss

WIDTH = 4
LEARNING_RATE = 0.3
MOMENTUM = 0.5


def main():
    time.sleep(float(os.environ["WORK_SECONDS"]))
    knobs = {"LEARNING_RATE": LEARNING_RATE, "WIDTH": WIDTH, "MOMENTUM": MOMENTUM}
    print(f"loss: {loss(knobs, 42, 'val')}")


if __name__ == "__main__":
    main()
'''


def _workspace(tmp: Path, seconds: float, experiments: int) -> Path:
    root = init_workspace("quadratic", tmp / "ws")
    text = (root / "nightlab.toml").read_text()
    assert tomllib.loads(text)["experiment"]["command"] == "python train.py"
    text = text.replace('evaluate = "python evaluate.py --split val"\n', "")
    text = text.replace('heldout = "python evaluate.py --split test"\n', "")
    text = text.replace('channel = "harness"', 'channel = "log"').replace("baseline_runs = 3", "baseline_runs = 2")
    text += f'\n[experiment.env]\nWORK_SECONDS = "{seconds}"\n\n[sandbox]\nmode = "off"\n'
    text = text.replace('[proposer]\nkind = "auto"', f'[proposer]\nkind = "replay"\nreplay = {{ patches = "{tmp / "patches"}" }}')
    (root / "nightlab.toml").write_text(text)
    (root / "train.py").write_text(TRAIN)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"], cwd=root, check=True)
    (tmp / "patches").mkdir()
    for i in range(experiments):
        # Each patch adds a constant after MOMENTUM, so it applies whichever commit is the best.
        (tmp / "patches" / f"{i:03d}.md").write_text(
            f"# description: extra constant {i}\ntrain.py\n<<<<<<< SEARCH\nMOMENTUM = 0.5\n=======\n"
            f"MOMENTUM = 0.5\nEXTRA_{i} = {i}\n>>>>>>> REPLACE\n"
        )
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--budget", type=float, default=60.0, help="the budget the overhead is compared to")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="nightlab-bench-") as tmp:
        root = _workspace(Path(tmp), args.seconds, args.experiments)
        start = time.monotonic()
        with console.status(f"running {args.experiments} experiments of {args.seconds:g}s ..."):
            state = ResearchLoop(root, RunOptions(tag="bench")).run_loop()
        wall = time.monotonic() - start
        journal = Journal.for_workspace(root)
        rows = journal.experiments(1)
        journal.close()
    candidates = [r for r in rows if r["kind"] == "candidate"]
    assert len(candidates) == args.experiments, state.stop_reason
    per = [
        (r["finished_at"] - r["started_at"]) - json.loads(r["timings_json"])["train"] for r in candidates
    ]
    command_total = sum(json.loads(r["timings_json"])["train"] for r in rows)
    overall = (wall - command_total) / len(rows)
    table = Table(title=f"loop overhead per experiment ({args.experiments} x {args.seconds:g}s command)")
    for col in ("measure", "seconds", f"% of a {args.budget:g}s budget"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    for name, value in [
        ("mean (experiment wall - command wall)", statistics.fmean(per)),
        ("median", statistics.median(per)),
        ("max", max(per)),
        ("whole run (wall - all command walls) / runs", overall),
    ]:
        table.add_row(name, f"{value:.3f}", f"{100 * value / args.budget:.2f}%")
    console.print(table)
    console.print(f"decisions: {state.decisions}; total wall {wall:.1f}s for {len(rows)} runs")


if __name__ == "__main__":
    main()
