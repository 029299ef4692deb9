"""Resident memory with 4 LoRA adapters on one base model vs 1: adapters share the base (goal < 1.2x).

Each adapter takes one training step first, so its gradients and Adam moments exist when memory is read.

    .venv/bin/python benchmarks/adapter_memory.py                 # SmolLM2 (prepared dir or offline GGUF)
    .venv/bin/python benchmarks/adapter_memory.py --model tiny
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import tempfile
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from nightlab.train import models
from nightlab.train.engine import AdamParams, Datum, Engine, LoraSpec


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or any name the engine resolves")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="default: $NIGHTLAB_DATA_DIR or ~/.nightlab"
    )
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    return parser.parse_args()


def rss_mb() -> float:
    """Resident memory of what is live: garbage collected, and freed heap handed back to the system first
    (glibc keeps freed blocks, e.g. an optimizer step's temporaries, resident until asked to trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    args = parse()
    name = args.model
    if name == "tiny":
        from nightlab.train.tiny import make_tiny_model

        name = str(make_tiny_model(Path(tempfile.gettempdir()) / "nightlab-bench-tiny"))
    engine = Engine(args.data_dir or models.default_data_dir(), device="cpu")
    vocab = engine.tokenizer(name).vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, size=(2, args.seq + 1))
    data = [Datum(row[:-1].tolist(), {"target_tokens": row[1:]}) for row in tokens]
    rows = [("base only", rss_mb())]

    def add_and_train(model_id: str) -> None:
        engine.create_adapter(model_id, name, LoraSpec(rank=args.rank, seed=0))
        engine.forward_backward(model_id, data, "cross_entropy", None)
        engine.optim_step(model_id, AdamParams())

    console = Console()
    with console.status("training adapters"):
        add_and_train("adapter-0")
        rows.append(("1 adapter", rss_mb()))
        for i in range(1, args.adapters):
            add_and_train(f"adapter-{i}")
        rows.append((f"{args.adapters} adapters", rss_mb()))

    table = Table(
        title=f"resident memory: {engine.model_info(name).name}, LoRA rank {args.rank} on all linear layers"
    )
    table.add_column("state")
    table.add_column("RSS MB", justify="right")
    for label, value in rows:
        table.add_row(label, f"{value:.0f}")
    console.print(table)
    one, many = rows[1][1], rows[2][1]
    lora_params = sum(p.numel() for p in engine._adapters["adapter-0"].params.values())  # noqa: SLF001
    state_mb = lora_params * 4 * 3 / 2**20  # fp32 weights + Adam's two moments: what an adapter must hold
    console.print(
        f"{args.adapters} adapters / 1 adapter = {many / one:.3f}x (goal < 1.2x); "
        f"{(many - one) / (args.adapters - 1):.1f} MB per extra adapter, "
        f"of which {state_mb:.1f} MB is its own state "
        f"({lora_params / 1e6:.2f}M LoRA parameters x 3 fp32 tensors)"
    )
    console.print(
        f"{args.adapters} separate processes (one base each) would hold about {args.adapters * one:.0f} MB: "
        f"{args.adapters * one / many:.2f}x what the shared base holds"
    )


if __name__ == "__main__":
    main()
