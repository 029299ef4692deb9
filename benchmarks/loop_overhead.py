"""How much time the research loop adds around each experiment, with and without the sandbox, in one run.

Two runs of the loop over the same prepared changes (replay proposer, quadratic workspace, harness metric
channel), one with `[sandbox] mode = "off"`, one with `"required"`, advance in turns of a few experiments each
(resuming their runs), so that whatever else the machine does weighs on both alike. Each experiment's training
sleeps a fixed time, standing in for the work the budget pays for. For every experiment but the first of a
turn (whose time would include resuming the run), the time from the previous experiment's journal row to its
own covers one whole cycle of the loop: proposing, applying and committing the change, its phases, deciding,
recording, checking the journal chain, restoring the state. Per experiment it reports

- cycle: that time;
- phases: the wall time of the experiment's commands (training and evaluation processes, bwrap included);
- loop: cycle minus phases, i.e. nightlab's own work;
- overhead: cycle minus the training's work, i.e. everything a budget does not pay for,

and compares the two modes. Goals: the sandbox adds under 0.3 s per experiment, and the overhead stays under
2% of a 60 s budget.

    .venv/bin/python benchmarks/loop_overhead.py [--experiments 20] [--seconds 2] [--turn 5] [--budget 60]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.sandbox import detect
from nightlab.research.workspace import init_workspace

ANCHOR = "MOMENTUM = 0.5"


@dataclass
class Timing:
    """Mean seconds per measured experiment of one mode."""

    mode: str
    experiments: int  # measured: all but the first experiment of each turn
    cycle: float
    phases: float
    loop: float
    overhead: float


def _workspace(tmp: Path, mode: str, seconds: float, experiments: int) -> Path:
    root = init_workspace("quadratic", tmp / mode)
    text = (root / "nightlab.toml").read_text()
    assert tomllib.loads(text)["experiment"]["heldout"], "the template changed; update this benchmark"
    text = text.replace('heldout = "python evaluate.py --split test"\n', "").replace(
        "baseline_runs = 3", "baseline_runs = 2"
    )
    patches = tmp / f"patches-{mode}"
    text = text.replace(
        '[proposer]\nkind = "auto"', f'[proposer]\nkind = "replay"\nreplay = {{ patches = "{patches}" }}'
    )
    text += f'\n[experiment.env]\nQUADRATIC_WORK_SECONDS = "{seconds}"\n\n[sandbox]\nmode = "{mode}"\n'
    (root / "nightlab.toml").write_text(text)
    subprocess.run(
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qam", "bench"], cwd=root, check=True
    )
    patches.mkdir()
    for i in range(experiments):
        # Each patch adds a constant next to MOMENTUM, so it applies whichever commit is the best.
        (patches / f"{i:03d}.md").write_text(
            f"# description: extra constant {i}\ntrain.py\n<<<<<<< SEARCH\n{ANCHOR}\n=======\n"
            f"{ANCHOR}\nEXTRA_{i} = {i}\n>>>>>>> REPLACE\n"
        )
    return root


def measure(root: Path, mode: str, seconds: float, turn: int) -> Timing:
    """Per-experiment times of the run in `root`, from its journal (see the module docstring)."""
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("bench").id)
    journal.close()
    cycles, phases, works = [], [], []
    candidates = [
        (before, row) for before, row in zip(rows, rows[1:], strict=False) if row.kind == "candidate"
    ]
    for i, (before, row) in enumerate(candidates):
        if i % turn == 0:
            continue  # the first of a turn: its time includes resuming the run
        cycles.append(row.finished_at - before.finished_at)
        phases.append(sum(row.timings.values()))
        works.append(seconds * len(row.metric_runs))  # re-runs train again
    return Timing(
        mode,
        len(cycles),
        statistics.fmean(cycles),
        statistics.fmean(phases),
        statistics.fmean(c - p for c, p in zip(cycles, phases, strict=True)),
        statistics.fmean(c - w for c, w in zip(cycles, works, strict=True)),
    )


def run_in_turns(roots: dict[str, Path], experiments: int, turn: int, console: Console) -> dict[str, float]:
    """Advance each mode's run `turn` experiments at a time, alternating, until each holds `experiments`."""
    totals = dict.fromkeys(roots, 0.0)
    for done in range(turn, experiments + turn, turn):
        for mode, root in roots.items():
            target = min(done, experiments)
            with console.status(f"sandbox {mode}: experiments up to {target} of {experiments} ..."):
                start = time.monotonic()
                state = ResearchLoop(root, RunOptions(tag="bench", max_experiments=target)).run_loop()
                totals[mode] += time.monotonic() - start
            if state.experiments != target:
                raise SystemExit(
                    f"{mode}: {state.experiments} of {target} experiments ran ({state.stop_reason})"
                )
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=20, help="experiments per mode")
    parser.add_argument("--seconds", type=float, default=2.0, help="the training's work per run (a sleep)")
    parser.add_argument("--turn", type=int, default=5, help="experiments a mode runs before the other's turn")
    parser.add_argument("--budget", type=float, default=60.0, help="the budget the overhead is compared to")
    args = parser.parse_args()
    console = Console()
    status = detect()
    modes = ["off", "required"] if status.available else ["off"]
    with tempfile.TemporaryDirectory(prefix="nightlab-bench-") as tmp:
        roots = {mode: _workspace(Path(tmp), mode, args.seconds, args.experiments) for mode in modes}
        totals = run_in_turns(roots, args.experiments, args.turn, console)
        timings = [measure(roots[mode], mode, args.seconds, args.turn) for mode in modes]
    table = Table(
        title=f"seconds per experiment ({args.experiments} experiments of {args.seconds:g}s work each, "
        f"in turns of {args.turn})"
    )
    for col in (
        "sandbox",
        "measured",
        "cycle",
        "phases",
        "loop (cycle - phases)",
        "overhead (cycle - work)",
        f"overhead % of {args.budget:g}s",
    ):
        table.add_column(col, justify="left" if col == "sandbox" else "right")
    for t in timings:
        table.add_row(
            t.mode,
            str(t.experiments),
            f"{t.cycle:.3f}",
            f"{t.phases:.3f}",
            f"{t.loop:.3f}",
            f"{t.overhead:.3f}",
            f"{100 * t.overhead / args.budget:.2f}%",
        )
    console.print(table)
    if len(timings) < 2:
        console.print(f"[yellow]no sandboxed run: {status.reason}[/]")
        return
    off, on = timings
    added = on.overhead - off.overhead
    console.print(
        f"sandbox adds {added:+.3f}s per experiment (goal < 0.3s: {'met' if added < 0.3 else 'MISSED'}); "
        f"loop's own time {off.loop:.3f}s unsandboxed, {on.loop:.3f}s sandboxed; "
        f"sandboxed overhead {100 * on.overhead / args.budget:.2f}% of {args.budget:g}s "
        f"(goal < 2%: {'met' if on.overhead < 0.02 * args.budget else 'MISSED'})"
    )
    console.print(f"{status.reason}; whole runs: " + ", ".join(f"{m} {t:.1f}s" for m, t in totals.items()))


if __name__ == "__main__":
    main()
