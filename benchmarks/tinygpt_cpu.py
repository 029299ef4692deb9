"""tinygpt on this CPU: the template's train.py against a plain nanoGPT-style model of the same size.

Both train on the same prepared data (Shakespeare by default), with the same width, depth, batch, context
and time budget, one after the other, and are scored by the same `prepare.evaluate_bpb`. The table shows
tokens per second and val_bpb for each and their ratios; `--repeats N` runs ours N times to show the
run-to-run spread (each repeat with a different NIGHTLAB_SEED_OFFSET).

    python benchmarks/tinygpt_cpu.py [--budget 60] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "nightlab" / "templates" / "tinygpt"
REFERENCE = Path(__file__).resolve().with_name("nanogpt_reference.py")


def _summary(output: str) -> dict[str, float]:
    tail = output.rsplit("\n---\n", 1)[-1]
    found = {}
    for line in tail.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            try:
                found[name.strip()] = float(value)
            except ValueError:
                continue
    return found


def _run(label: str, argv: list[str], cwd: Path, env: dict[str, str], console: Console) -> dict[str, float]:
    console.print(f"[bold]{label}[/]: {' '.join(argv)}")
    start = time.time()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or "val_bpb" not in done.stdout:
        raise SystemExit(f"{label} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = _summary(done.stdout)
    console.print(f"  val_bpb {result['val_bpb']:.4f}, {result['tokens_per_second']:,.0f} tok/s, "
                  f"{result['num_steps']:.0f} steps, {time.time() - start:.0f}s wall")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds for each run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of our train.py (spread = noise)")
    args = parser.parse_args()
    console = Console()
    env = {**os.environ, "NIGHTLAB_BUDGET_SECONDS": f"{args.budget:g}"}
    env.pop("NIGHTLAB_PHASE", None)  # by hand: train.py scores itself
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as tmp:
        ws = Path(tmp) / "ws"
        shutil.copytree(TEMPLATE, ws, ignore=shutil.ignore_patterns("__pycache__", "run"))
        start = time.time()
        subprocess.run([sys.executable, "prepare.py"], cwd=ws, env=env, check=True)
        console.print(f"prepare: {time.time() - start:.1f}s")
        ours = [
            _run(f"tinygpt train.py #{i + 1}", [sys.executable, "train.py"], ws, {**env, "NIGHTLAB_SEED_OFFSET": str(i)},
                 console)
            for i in range(args.repeats)
        ]
        ref = _run("nanoGPT reference", [sys.executable, str(REFERENCE), "--workspace", str(ws), "--budget",
                                         f"{args.budget:g}"], ws, env, console)

    mine = {k: statistics.fmean(r[k] for r in ours) for k in ("val_bpb", "tokens_per_second", "num_steps",
                                                               "num_params_M", "total_seconds")}
    table = Table(title=f"tinygpt vs nanoGPT-style reference, {args.budget:g}s budget, {os.cpu_count()} CPU cores")
    for column in ("model", "tokens/s", "val_bpb", "steps", "params (M)", "total s"):
        table.add_column(column, justify="right")
    for name, r in (("tinygpt (ours)", mine), ("nanoGPT reference", ref)):
        table.add_row(name, f"{r['tokens_per_second']:,.0f}", f"{r['val_bpb']:.4f}", f"{r['num_steps']:.0f}",
                      f"{r['num_params_M']:.2f}", f"{r['total_seconds']:.0f}")
    console.print(table)
    console.print(f"tokens/s ratio (ours / reference): {mine['tokens_per_second'] / ref['tokens_per_second']:.2f}x")
    console.print(f"val_bpb: ours {mine['val_bpb']:.4f} vs reference {ref['val_bpb']:.4f} "
                  f"({ref['val_bpb'] - mine['val_bpb']:+.4f} better)")
    if len(ours) > 1:
        values = [r["val_bpb"] for r in ours]
        console.print(f"run-to-run val_bpb over {len(values)} runs: {', '.join(f'{v:.4f}' for v in values)}; "
                      f"spread {max(values) - min(values):.4f}, stdev {statistics.stdev(values):.4f}")


if __name__ == "__main__":
    main()
