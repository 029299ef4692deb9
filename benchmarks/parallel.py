"""Experiments per hour with N workers on a local Ray cluster, against N times one experiment at a time.

Each N runs the quadratic workspace with the tune proposer, its training sleeping `--seconds` (a
sleep-bound workload: what parallel workers can honestly overlap on any machine), `--rounds` x N
candidates, each measured once (`decide.confirm = false`, so every candidate costs one run and the rate is
not a matter of which ones got re-runs). N = 1 is the plain loop (no Ray). The rate counts the candidates
from the first one's start to the last one's record, so Ray's start-up and the baseline are left out, as
they are once per night. Goal: at least 0.9 x N x the single rate.

    .venv/bin/python benchmarks/parallel.py [--workers 1 2 4 8] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.workspace import init_workspace


def workspace(tmp: Path, workers: int, seconds: float) -> Path:
    """The quadratic toy, its training sleeping `seconds`, each candidate run once."""
    root = init_workspace("quadratic", tmp / f"ws-{workers}")
    text = (root / "nightlab.toml").read_text()
    text = text.replace('heldout = "python evaluate.py --split test"\n', "")
    text = text.replace("budget_seconds = 5", f"budget_seconds = {seconds + 2:g}")
    text = text.replace(
        "timeout_seconds = 60", f'timeout_seconds = 60\nenv = {{ QUADRATIC_WORK_SECONDS = "{seconds:g}" }}'
    )
    text = text.replace(
        "baseline_runs = 3",
        "baseline_runs = 2\nconfirm = false\nimplausible_sigmas = 1e9\nearly_abort = false",
    )
    text += "\n[parallel]\ncpus_per_experiment = 0.1\n"
    (root / "nightlab.toml").write_text(text)
    subprocess.run(["git", "commit", "-qam", "benchmark settings"], cwd=root, check=True)
    return root


def rate(tmp: Path, workers: int, seconds: float, rounds: int) -> tuple[int, float]:
    """(candidates, candidates per hour) of one run with `workers` at once."""
    root = workspace(tmp, workers, seconds)
    count = rounds * workers
    options = RunOptions(tag="bench", proposer="tune", workers=workers, max_experiments=count)
    ResearchLoop(root, options).run_loop()
    journal = Journal.for_workspace(root)
    try:
        rows = [r for r in journal.experiments(1) if r.kind == "candidate"]
    finally:
        journal.close()
    span = max(r.finished_at or 0.0 for r in rows) - min(r.started_at for r in rows)
    return len(rows), len(rows) / span * 3600


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=5.0, help="training seconds per experiment")
    parser.add_argument("--rounds", type=int, default=3, help="candidates per worker")
    args = parser.parse_args()
    console = Console()
    results: dict[int, tuple[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nightlab-parallel-") as tmp:
        for n in sorted(set([1, *args.workers])):
            console.print(f"{n} worker(s): {args.rounds * n} candidates of {args.seconds:g} s ...")
            results[n] = rate(Path(tmp), n, args.seconds, args.rounds)
    single = results[1][1]
    table = Table(title=f"experiments per hour, {args.seconds:g} s sleep-bound training, local Ray")
    for column in ("workers", "candidates", "per hour", "x single", "efficiency (x single / N)"):
        table.add_column(column, justify="right")
    for n, (count, per_hour) in results.items():
        speedup = per_hour / single
        table.add_row(str(n), str(count), f"{per_hour:.0f}", f"{speedup:.2f}", f"{speedup / n:.2f}")
    console.print(table)
    worst = min(results[n][1] / single / n for n in results)
    console.print(f"lowest efficiency {worst:.2f} (goal >= 0.90)")


if __name__ == "__main__":
    main()
