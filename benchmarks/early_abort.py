"""Early abort on a replayed run: the training time it saves on changes that lose, and the keeps it costs.

The same planted changes (three real gains, nine that lose, from slightly to badly) are replayed three
times on the quadratic workspace, whose simulated training sleeps through its budget printing a progress
curve: with `decide.early_abort = false`, then on, judged against every kept run's curve
(`decide.abort_against = "kept"`), then against the best's (the default). Per mode the table gives the
training seconds spent on candidates that were not kept, the training seconds on the kept ones, and which
changes were kept. Goals: at least 30% of the losing candidates' training saved, no keep lost.

    .venv/bin/python benchmarks/early_abort.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.workspace import init_workspace

GAINS = {
    "lower the LR": ("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.1"),
    "raise the momentum": ("MOMENTUM = 0.5", "MOMENTUM = 0.8"),
    "widen": ("WIDTH = 4", "WIDTH = 10"),
}
LOSSES = {
    "much higher LR": ("LEARNING_RATE = 0.1", "LEARNING_RATE = 1.0"),
    "higher LR": ("LEARNING_RATE = 0.1", "LEARNING_RATE = 0.4"),
    "slightly higher LR": ("LEARNING_RATE = 0.1", "LEARNING_RATE = 0.15"),
    "no momentum": ("MOMENTUM = 0.8", "MOMENTUM = 0.0"),
    "less momentum": ("MOMENTUM = 0.8", "MOMENTUM = 0.6"),
    "width 1": ("WIDTH = 10", "WIDTH = 1"),
    "width 40": ("WIDTH = 10", "WIDTH = 40"),
    "width 8": ("WIDTH = 10", "WIDTH = 8"),
    "tiny LR": ("LEARNING_RATE = 0.1", "LEARNING_RATE = 0.001"),
}
# Gains first, each followed by three of the losses, so that the losses meet a best that moved.
ORDER = [
    "lower the LR",
    "much higher LR",
    "higher LR",
    "tiny LR",
    "raise the momentum",
    "no momentum",
    "less momentum",
    "slightly higher LR",
    "widen",
    "width 1",
    "width 40",
    "width 8",
]


@dataclass
class Outcome:
    mode: str
    losing_seconds: float
    kept_seconds: float
    kept: list[str]
    aborted: int


def patch(description: str, old: str, new: str) -> str:
    return f"# description: {description}\ntrain.py\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"


MODES = {
    "full budget": (False, "kept"),
    "abort, vs every kept run": (True, "kept"),
    "abort, vs the best": (True, "best"),
}


def run_mode(tmp: Path, mode: str, seconds: float) -> Outcome:
    early_abort, against = MODES[mode]
    slug = "".join(c if c.isalnum() else "-" for c in mode)
    root = init_workspace("quadratic", tmp / slug)
    text = (root / "nightlab.toml").read_text()
    assert tomllib.loads(text)["metric"]["name"] == "loss", "the template changed; update this benchmark"
    text = text.replace('heldout = "python evaluate.py --split test"\n', "")
    text = text.replace("budget_seconds = 5", f"budget_seconds = {seconds * 1.05:g}")
    text = text.replace('channel = "harness"', 'channel = "harness"\nprogress = "loss"')
    text = text.replace(
        "baseline_runs = 3",
        f'baseline_runs = 3\nearly_abort = {str(early_abort).lower()}\nabort_against = "{against}"',
    )
    patches = tmp / f"patches-{slug}"
    patches.mkdir()
    changes = GAINS | LOSSES
    for i, name in enumerate(ORDER):
        (patches / f"{i:02d}.md").write_text(patch(name, *changes[name]))
    text = text.replace('kind = "auto"', f'kind = "replay"\n[proposer.replay]\npatches = "{patches}"')
    text += f'\n[experiment.env]\nQUADRATIC_WORK_SECONDS = "{seconds}"\n'
    (root / "nightlab.toml").write_text(text)
    for args in (["add", "-A"], ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    ResearchLoop(root, RunOptions(tag="bench")).run_loop()
    journal = Journal.for_workspace(root)
    rows = [r for r in journal.experiments(journal.find_run("bench").id) if r.kind == "candidate"]
    journal.close()

    def train_seconds(r) -> float:  # noqa: ANN001 - a journal Experiment
        return sum(v for k, v in r.timings.items() if k.startswith("train"))

    kept = [r for r in rows if r.decision == "keep"]
    return Outcome(
        mode,
        sum(train_seconds(r) for r in rows if r.decision != "keep"),
        sum(train_seconds(r) for r in kept),
        [r.description for r in kept],
        sum(r.decision == "aborted" for r in rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="simulated training time per run")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="nightlab-abort-") as tmp:
        results = []
        for mode in MODES:
            console.print(f"replaying {len(ORDER)} changes: {mode} ...")
            results.append(run_mode(Path(tmp), mode, args.seconds))
    full = results[0]
    table = Table(title=f"early abort, {len(ORDER)} planted changes, {args.seconds:g} s of training per run")
    for column in ("mode", "train s on losers", "train s on keeps", "aborted", "kept"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.mode, f"{r.losing_seconds:.1f}", f"{r.kept_seconds:.1f}", str(r.aborted), ", ".join(r.kept)
        )
    console.print(table)
    for abort in results[1:]:
        saved = 1 - abort.losing_seconds / full.losing_seconds
        lost = sorted(set(full.kept) - set(abort.kept))
        console.print(
            f"{abort.mode}: training saved on losing changes {saved:.0%} (goal >= 30%); keeps lost "
            f"{len(lost)}{' ' + ', '.join(lost) if lost else ''} (goal 0)"
        )


if __name__ == "__main__":
    main()
