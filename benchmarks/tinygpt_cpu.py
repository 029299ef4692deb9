"""tinygpt on this machine: the template's train.py against a plain nanoGPT-style model of the same size.

Both train on the same prepared data (Shakespeare by default), with the same width, depth, batch, context
and time budget, and are scored on the same validation tokens. With `--repeats N` each runs N times,
alternating (ours, reference, ours, ...), so that a machine that slows down or speeds up over the minutes
affects both alike. Ours runs the way the loop runs it: `prepare.py` (cached after the first time), `train.py`
as the train phase, then the harness's `prepare.py evaluate`; each step is timed. The table shows tokens per
second, val_bpb, MFU and the time of each step (means over the repeats), and the ratios. Ours runs each repeat
with a different NIGHTLAB_SEED_OFFSET, so its val_bpb spread is the loop's noise floor.

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
    found = {}
    for line in output.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            try:
                found[name.strip()] = float(value)
            except ValueError:
                continue
    return found


def _step(label: str, argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[dict[str, float], float]:
    """Run one command; its `name: value` lines and its wall time."""
    start = time.time()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"{label} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return _summary(done.stdout), time.time() - start


def _ours(ws: Path, env: dict[str, str], repeat: int, console: Console) -> dict[str, float]:
    """One experiment as the loop runs it: prepare (cached), the train phase, the harness evaluate."""
    env = {**env, "NIGHTLAB_SEED_OFFSET": str(repeat), "NIGHTLAB_PHASE": "train"}
    _, prepare_s = _step("prepare.py", [sys.executable, "prepare.py"], ws, env)
    result, train_s = _step("train.py", [sys.executable, "train.py"], ws, env)
    scored, eval_s = _step(
        "prepare.py evaluate",
        [sys.executable, "prepare.py", "evaluate", "--split", "val"],
        ws,
        {**env, "NIGHTLAB_PHASE": "evaluate"},
    )
    result.update(
        val_bpb=scored["val_bpb"],
        prepare_s=prepare_s,
        train_s=train_s,
        eval_s=eval_s,
        total_seconds=prepare_s + train_s + eval_s,
    )
    console.print(
        f"[bold]tinygpt #{repeat + 1}[/]: val_bpb {result['val_bpb']:.4f}, "
        f"{result['tokens_per_second']:,.0f} tok/s, {result['num_steps']:.0f} steps; "
        f"prepare {prepare_s:.1f}s, "
        f"train {train_s:.1f}s, evaluate {eval_s:.1f}s"
    )
    return result


def _reference(
    ws: Path, env: dict[str, str], budget: float, repeat: int, console: Console
) -> dict[str, float]:
    argv = [sys.executable, str(REFERENCE), "--workspace", str(ws), "--budget", f"{budget:g}"]
    result, seconds = _step("nanoGPT reference", argv, ws, {**env, "NIGHTLAB_PHASE": ""})
    result["total_seconds"] = seconds
    console.print(
        f"[bold]reference #{repeat + 1}[/]: val_bpb {result['val_bpb']:.4f}, "
        f"{result['tokens_per_second']:,.0f} tok/s, {result['num_steps']:.0f} steps"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds for each run")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each, alternating (our spread = the noise floor)"
    )
    args = parser.parse_args()
    console = Console(width=120)
    env = {**os.environ, "NIGHTLAB_BUDGET_SECONDS": f"{args.budget:g}"}
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as tmp:
        ws = Path(tmp) / "ws"
        shutil.copytree(TEMPLATE, ws, ignore=shutil.ignore_patterns("__pycache__", "run"))
        _, first = _step("prepare.py", [sys.executable, "prepare.py"], ws, env)
        console.print(f"first prepare (data, tokenizer, peak-FLOP probe): {first:.1f}s")
        ours, refs = [], []
        for repeat in range(args.repeats):
            ours.append(_ours(ws, env, repeat, console))
            refs.append(_reference(ws, env, args.budget, repeat, console))
    keys = (
        "val_bpb",
        "tokens_per_second",
        "mfu_percent",
        "num_steps",
        "num_params_M",
        "prepare_s",
        "train_s",
        "eval_s",
        "total_seconds",
    )
    mine = {k: statistics.fmean(r[k] for r in ours) for k in keys}
    ref = {
        k: statistics.fmean(r[k] for r in refs)
        for k in ("val_bpb", "tokens_per_second", "num_steps", "num_params_M", "total_seconds")
    }
    table = Table(
        title=f"tinygpt vs nanoGPT-style reference, {args.budget:g}s budget, {os.cpu_count()} CPU cores"
    )
    for column in ("model", "tokens/s", "val_bpb", "MFU %", "steps", "params (M)", "evaluate s", "total s"):
        table.add_column(column, justify="right")
    table.add_row(
        "tinygpt (ours)",
        f"{mine['tokens_per_second']:,.0f}",
        f"{mine['val_bpb']:.4f}",
        f"{mine['mfu_percent']:.1f}",
        f"{mine['num_steps']:.0f}",
        f"{mine['num_params_M']:.2f}",
        f"{mine['eval_s']:.1f}",
        f"{mine['total_seconds']:.0f}",
    )
    table.add_row(
        "nanoGPT reference",
        f"{ref['tokens_per_second']:,.0f}",
        f"{ref['val_bpb']:.4f}",
        "-",
        f"{ref['num_steps']:.0f}",
        f"{ref['num_params_M']:.2f}",
        "(in process)",
        f"{ref['total_seconds']:.0f}",
    )
    console.print(table)
    pairs = [o["tokens_per_second"] / r["tokens_per_second"] for o, r in zip(ours, refs, strict=True)]
    console.print(
        f"tokens/s ratio (ours / reference): {mine['tokens_per_second'] / ref['tokens_per_second']:.2f}x"
        f" (each pair: {', '.join(f'{p:.2f}x' for p in pairs)})"
    )
    console.print(
        f"val_bpb: ours {mine['val_bpb']:.4f} vs reference {ref['val_bpb']:.4f} "
        f"({ref['val_bpb'] - mine['val_bpb']:+.4f} better)"
    )
    console.print(
        f"one experiment after the first prepare: {mine['total_seconds']:.0f}s "
        f"(prepare {mine['prepare_s']:.1f}s, "
        f"train {mine['train_s']:.1f}s, evaluate {mine['eval_s']:.1f}s = "
        f"{100 * mine['eval_s'] / args.budget:.1f}% of the budget)"
    )
    if len(ours) > 1:
        values = [r["val_bpb"] for r in ours]
        console.print(
            f"run-to-run val_bpb over {len(values)} runs: {', '.join(f'{v:.4f}' for v in values)}; "
            f"spread {max(values) - min(values):.4f}, stdev {statistics.stdev(values):.4f}"
        )


if __name__ == "__main__":
    main()
