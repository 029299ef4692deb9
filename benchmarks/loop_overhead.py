"""How much time the research loop adds around each experiment, with and without the sandbox, in one run.

Runs the loop twice over the same prepared changes (replay proposer, quadratic workspace, harness metric
channel): once with `[sandbox] mode = "off"`, once with `"required"`. Each experiment's training sleeps a fixed
time, standing in for the work the budget pays for. Per experiment it reports

- wall: the experiment from start to journal row;
- phases: the wall time of its phases (training and evaluation processes, bwrap included when sandboxed);
- loop: wall minus phases, i.e. nightlab's own work (git, harness hashes, journal, decisions);
- overhead: wall minus the training's work, i.e. everything a budget does not pay for,

and compares the two modes. Goals: the sandbox adds under 0.3 s per experiment, and the overhead stays under
2% of a 60 s budget.

    .venv/bin/python benchmarks/loop_overhead.py [--experiments 20] [--seconds 1] [--budget 60]
"""

from __future__ import annotations

import argparse
import json
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
    """Mean seconds per experiment of one mode."""

    mode: str
    experiments: int
    wall: float
    phases: float
    loop: float
    overhead: float
    total: float


def _workspace(tmp: Path, mode: str, seconds: float, experiments: int) -> Path:
    root = init_workspace("quadratic", tmp / mode)
    text = (root / "nightlab.toml").read_text()
    assert tomllib.loads(text)["experiment"]["heldout"], "the template changed; update this benchmark"
    text = text.replace('heldout = "python evaluate.py --split test"\n', "").replace("baseline_runs = 3", "baseline_runs = 2")
    patches = tmp / f"patches-{mode}"
    text = text.replace('[proposer]\nkind = "auto"', f'[proposer]\nkind = "replay"\nreplay = {{ patches = "{patches}" }}')
    text += f'\n[experiment.env]\nQUADRATIC_WORK_SECONDS = "{seconds}"\n\n[sandbox]\nmode = "{mode}"\n'
    (root / "nightlab.toml").write_text(text)
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qam", "bench"], cwd=root, check=True)
    patches.mkdir()
    for i in range(experiments):
        # Each patch adds a constant next to MOMENTUM, so it applies whichever commit is the best.
        (patches / f"{i:03d}.md").write_text(
            f"# description: extra constant {i}\ntrain.py\n<<<<<<< SEARCH\n{ANCHOR}\n=======\n"
            f"{ANCHOR}\nEXTRA_{i} = {i}\n>>>>>>> REPLACE\n"
        )
    return root


def measure(tmp: Path, mode: str, seconds: float, experiments: int) -> Timing:
    root = _workspace(tmp, mode, seconds, experiments)
    start = time.monotonic()
    state = ResearchLoop(root, RunOptions(tag="bench")).run_loop()
    total = time.monotonic() - start
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("bench").id)
    journal.close()
    candidates = [r for r in rows if r["kind"] == "candidate"]
    if len(candidates) != experiments:
        raise SystemExit(f"{mode}: {len(candidates)} of {experiments} experiments ran ({state.stop_reason})")
    walls = [r["finished_at"] - r["started_at"] for r in candidates]
    phases = [sum(json.loads(r["timings_json"] or "{}").values()) for r in candidates]
    works = [seconds * len(json.loads(r["metric_runs_json"] or "[0]")) for r in candidates]  # confirmations re-train
    return Timing(
        mode, experiments, statistics.fmean(walls), statistics.fmean(phases),
        statistics.fmean(w - p for w, p in zip(walls, phases, strict=True)),
        statistics.fmean(w - k for w, k in zip(walls, works, strict=True)), total,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=20, help="experiments per mode")
    parser.add_argument("--seconds", type=float, default=1.0, help="the training's work per run (a sleep)")
    parser.add_argument("--budget", type=float, default=60.0, help="the budget the overhead is compared to")
    args = parser.parse_args()
    console = Console()
    status = detect()
    modes = ["off", "required"] if status.available else ["off"]
    timings = []
    with tempfile.TemporaryDirectory(prefix="nightlab-bench-") as tmp:
        for mode in modes:
            with console.status(f"sandbox {mode}: {args.experiments} experiments of {args.seconds:g}s work ..."):
                timings.append(measure(Path(tmp), mode, args.seconds, args.experiments))
    table = Table(title=f"seconds per experiment ({args.experiments} experiments of {args.seconds:g}s work each)")
    for col in ("sandbox", "wall", "phases", "loop (wall - phases)", "overhead (wall - work)",
                f"overhead % of {args.budget:g}s"):
        table.add_column(col, justify="left" if col == "sandbox" else "right")
    for t in timings:
        table.add_row(t.mode, f"{t.wall:.3f}", f"{t.phases:.3f}", f"{t.loop:.3f}", f"{t.overhead:.3f}",
                      f"{100 * t.overhead / args.budget:.2f}%")
    console.print(table)
    if len(timings) < 2:
        console.print(f"[yellow]no sandboxed run: {status.reason}[/]")
        return
    off, on = timings
    added = on.wall - off.wall
    console.print(
        f"sandbox adds {added:+.3f}s per experiment (goal < 0.3s: {'met' if added < 0.3 else 'MISSED'}); "
        f"overhead ratio sandboxed / unsandboxed = {on.overhead / off.overhead:.2f}x; "
        f"sandboxed overhead {100 * on.overhead / args.budget:.2f}% of {args.budget:g}s "
        f"(goal < 2%: {'met' if on.overhead < 0.02 * args.budget else 'MISSED'})"
    )
    console.print(f"{status.reason}; whole runs: " + ", ".join(f"{t.mode} {t.total:.1f}s" for t in timings))


if __name__ == "__main__":
    main()
