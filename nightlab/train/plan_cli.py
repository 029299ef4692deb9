"""`nightlab plan`: the planner's peak memory of LoRA training and sampling, and which bases fit a machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nightlab.console import fail


def plan(
    model: Annotated[
        str,
        typer.Argument(
            help="A catalogue name (e.g. Llama-3.3-70B, Qwen3-8B), a Hugging Face model directory, a "
            "prepared model, or smollm2."
        ),
    ],
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 32,
    seq: Annotated[
        int, typer.Option(min=1, help="Tokens per sequence: training, or prompt + completion when sampling.")
    ] = 2048,
    batch: Annotated[int, typer.Option(min=1, help="Sequences per training step, or sampled at once.")] = 1,
    quant: Annotated[str, typer.Option(help="Base weights: none, nf4 or int8.")] = "none",
    device: Annotated[
        str | None,
        typer.Option(help="cpu, cuda or mps: decides the compute dtype (default: the machine's)."),
    ] = None,
    machine: Annotated[
        str | None,
        typer.Option(help="Say what fits a named machine instead of this one, e.g. dgx-spark, rtx-4090."),
    ] = None,
    checkpointing: Annotated[
        bool,
        typer.Option(help="Plan activations with gradient checkpointing (the engine runs without it)."),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where prepared models live (default: $NIGHTLAB_DATA_DIR or ~/.nightlab)."),
    ] = None,
) -> None:
    """Predict peak memory of LoRA training and sampling on MODEL (weights, adapters, optimizer state,
    activations, KV cache), and list which popular bases fit this machine or a named one."""
    from rich.console import Console
    from rich.table import Table

    from nightlab import hardware
    from nightlab.train import models, planner
    from nightlab.train.quantize import SCHEMES, check_scheme

    try:
        if machine is None:
            machine_device = hardware.accelerator() or "cpu"
            memory = planner.device_memory(machine_device, free=False)
            where = f"this machine ({machine_device})"
        elif machine in planner.MACHINES:
            memory_gib, machine_device = planner.MACHINES[machine]
            memory, where = memory_gib * planner.GIB, machine
        else:
            raise planner.PlanError(f"unknown machine {machine!r}: one of {', '.join(planner.MACHINES)}")
        kind = planner.device_kind(device or machine_device)
        work = planner.Workload(rank, seq, batch, check_scheme(quant), kind, checkpointing)
        name, arch = planner.architecture_of(model, data_dir or models.default_data_dir())
    except (planner.PlanError, models.UnknownModelError, ValueError) as exc:
        fail(exc)
    train, sample = planner.training(arch, work), planner.sampling(arch, work)
    table = Table(
        title=f"{name}: {arch.total_parameters() / 1e9:.2f}B parameters, {quant} on {kind}, LoRA rank {rank}"
    )
    table.add_column("GiB")
    table.add_column(f"training ({planner.training_tokens(work)} tokens per microbatch)", justify="right")
    table.add_column(f"sampling ({batch} x {seq} tokens)", justify="right")
    for (label, trained), (_, sampled) in zip(train.rows(), sample.rows(), strict=True):
        table.add_row(label, planner.gib(trained), planner.gib(sampled))
    table.add_row("peak", planner.gib(train.total), planner.gib(sample.total), style="bold")
    console = Console()
    console.print(table)
    usable = memory * planner.USABLE_FRACTION
    fit_table = Table(
        title=f"LoRA training that fits {where}: {planner.gib(usable)} of {planner.gib(memory)} GiB usable"
    )
    fit_table.add_column("model")
    for scheme in SCHEMES:
        fit_table.add_column(scheme, justify="right")
    for entry, entry_arch in planner.CATALOGUE.items():
        cells = []
        for scheme in SCHEMES:
            scheme_work = planner.Workload(rank, seq, batch, scheme, kind, checkpointing)
            need = planner.training(entry_arch, scheme_work)
            mark = "[green]fits[/]" if planner.fits(need, memory) else "[red]no[/]"
            cells.append(f"{planner.gib(need.total)} {mark}")
        fit_table.add_row(entry, *cells)
    console.print(fit_table)
