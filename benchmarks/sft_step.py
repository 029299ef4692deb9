"""One LoRA SFT step through the training service vs a hand-written transformers + PEFT loop.

The service path is the official tinker SDK (forward_backward + optim_step, sent back to back as the SDK
intends) against `nightlab serve`'s app started in-process on 127.0.0.1; the engine path calls the engine
directly, which shows what the HTTP + protobuf layer costs. Same model, batch, LoRA rank and targets, same
autocast choice; the paths run in turn in one process so a busy machine slows them alike. Prints seconds per
step and the ratio service / hand-written (goal <= 1.10).

    .venv/bin/python benchmarks/sft_step.py                       # SmolLM2 (prepared dir or offline GGUF)
    .venv/bin/python benchmarks/sft_step.py --model tiny --batch 4 --seq 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nightlab.train import models
from nightlab.train.api.app import create_app
from nightlab.train.api.background import BackgroundServer, serve_in_thread
from nightlab.train.engine import AdamParams, Datum, Engine, LoraSpec
from nightlab.train.forward import pick_autocast
from nightlab.train.lora import LORA_ALPHA
from nightlab.train.settings import ServeSettings

KEY = "tml-benchmark"
LEARNING_RATE = 1e-5


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or any name the engine resolves")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="default: $NIGHTLAB_DATA_DIR or ~/.nightlab"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def hand_written_step(model, optimizer, input_ids, autocast) -> float:
    """The loop a user would write: HF's own loss on labels, backward, AdamW."""
    context = (
        torch.autocast(input_ids.device.type, dtype=autocast)
        if autocast
        else torch.autocast("cpu", enabled=False)
    )
    with context:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def service_step(
    engine: Engine, name: str, rank: int, tokens: np.ndarray, data_dir: Path
) -> tuple[Callable[[], None], BackgroundServer]:
    """A training client of the service (on the engine's loaded base, records in `data_dir`) and one step."""
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    import tinker
    from tinker import types

    settings = ServeSettings(data_dir=data_dir, api_keys=[KEY])
    server = serve_in_thread(create_app(settings, engine))
    service = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    client = service.create_lora_training_client(base_model=name, rank=rank, seed=0).result()
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": row[1:]},
        )
        for row in tokens
    ]
    adam = types.AdamParams(learning_rate=LEARNING_RATE)

    def step() -> None:
        forward_backward = client.forward_backward(data, "cross_entropy")
        optim_step = client.optim_step(adam)
        forward_backward.result()
        optim_step.result()

    return step, server


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    data_dir = args.data_dir or models.default_data_dir()
    name = args.model
    if name == "tiny":
        from nightlab.train.tiny import make_tiny_model

        name = str(make_tiny_model(Path(tempfile.gettempdir()) / "nightlab-bench-tiny"))
    engine = Engine(data_dir, device=args.device, precision=args.precision)
    engine.create_adapter("bench", name, LoraSpec(rank=args.rank, seed=0))
    autocast = pick_autocast(engine.device, args.precision)
    vocab = engine.tokenizer(name).vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, size=(args.batch, args.seq + 1))
    data = [Datum(row[:-1].tolist(), {"target_tokens": row[1:]}) for row in tokens]
    adam = AdamParams(learning_rate=LEARNING_RATE)

    # the hand-written side gets its own copy of the base, wrapped by PEFT the usual way
    from peft import LoraConfig, get_peft_model

    resolved = models.resolve(name, data_dir)
    plain, _, _ = models.load(resolved, data_dir, device=engine.device)
    targets = [n for n, module in plain.named_modules() if isinstance(module, torch.nn.Linear)]  # lm_head too
    config = LoraConfig(r=args.rank, lora_alpha=LORA_ALPHA, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(plain, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    input_ids = torch.from_numpy(tokens[:, :-1]).to(engine.device)

    def engine_step() -> None:
        engine.forward_backward("bench", data, "cross_entropy", None)
        engine.optim_step("bench", adam)

    def plain_step() -> None:
        hand_written_step(peft_model, optimizer, input_ids, autocast)

    console = Console()
    service_dir = tempfile.TemporaryDirectory(prefix="nightlab-bench-")
    with console.status("starting the service"):
        through_service, server = service_step(engine, name, args.rank, tokens, Path(service_dir.name))
    paths = {"service (tinker SDK)": through_service, "engine": engine_step, "hand-written": plain_step}
    times: dict[str, list[float]] = {label: [] for label in paths}
    try:
        with console.status("timing") as status:
            for step in range(args.steps + 1):
                for label, fn in paths.items():
                    status.update(f"step {step}/{args.steps}: {label}")
                    start = time.perf_counter()
                    fn()
                    if step:  # step 0 warms up allocators and kernels
                        times[label].append(time.perf_counter() - start)
    finally:
        server.stop()
        service_dir.cleanup()

    table = Table(
        title=f"LoRA SFT step: {resolved.name}, batch {args.batch}x{args.seq}, rank {args.rank}, "
        f"autocast {autocast or 'off'}, {torch.get_num_threads()} threads"
    )
    for column in ("path", "median s/step", "min s/step", "tokens/s"):
        table.add_column(column, justify="right")
    for label, values in times.items():
        median = statistics.median(values)
        table.add_row(label, f"{median:.3f}", f"{min(values):.3f}", f"{args.batch * args.seq / median:.0f}")
    console.print(table)
    baseline = statistics.median(times["hand-written"])
    for label in ("service (tinker SDK)", "engine"):
        goal = " (goal <= 1.10x)" if label.startswith("service") else ""
        console.print(f"{label} / hand-written = {statistics.median(times[label]) / baseline:.2f}x{goal}")


if __name__ == "__main__":
    main()
