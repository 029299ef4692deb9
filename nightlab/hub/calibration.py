"""How fast this machine is, as one number, so results from different hardware compare on one scale.

The score is the machine's float32 matrix-product rate (what training steps spend their time on) over the
reference machine's, which does the CPU workload (384x384, 40 products) in 50 ms: the reference scores 1.0,
a machine twice as fast 2.0. Where PyTorch sees a GPU (or Apple's MPS) the experiments run there, so the
workload runs there too, with matrices large enough (4096x4096) to measure the device and not its launch
overhead; both rates are FLOP/s, so CPU and GPU machines share the scale. It runs once per machine (a few
seconds) and is cached in nightlab's cache dir, keyed by the workload.

Normalisation (`normalise`): a time-like metric (its name says seconds, time, latency or ms) is what the
reference machine would have measured, `value * score`: a run that took 10 s on a machine scoring 2.0 counts
as 20 s. Every other metric (loss, bits per byte, accuracy) is compared raw: under a fixed time budget a
faster machine trains more steps, but by no ratio we could honestly compute, so the hub shows the machine and
its score beside the value instead of inventing a correction.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nightlab.paths import cache_dir

REFERENCE_SECONDS = 0.05  # the reference machine's time for the CPU workload
TIME_LIKE = re.compile(r"(seconds|time|latency|(^|_)ms($|_)|(^|_)s$)", re.IGNORECASE)


@dataclass(frozen=True)
class Workload:
    """A fixed chain of float32 matrix products."""

    size: int
    products: int
    repeats: int = 3

    @property
    def flops(self) -> float:
        return 2.0 * self.size**3 * self.products

    def describe(self, device: str) -> str:
        shape = f"{self.size}x{self.size}"
        return f"float32 matmul {shape}, {self.products} products, best of {self.repeats}, {device}"


CPU_WORKLOAD = Workload(384, 40)
ACCELERATOR_WORKLOAD = Workload(4096, 10)
REFERENCE_FLOPS = CPU_WORKLOAD.flops / REFERENCE_SECONDS


@dataclass(frozen=True)
class Calibration:
    machine_id: str
    accelerator: str
    memory_gb: float
    score: float
    workload: str = CPU_WORKLOAD.describe("cpu")


def _numpy_seconds(work: Workload) -> float:
    """Best-of-`repeats` time of the chain on the CPU (the best: a busy moment must not count)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((work.size, work.size), dtype=np.float32)
    b = rng.standard_normal((work.size, work.size), dtype=np.float32) / work.size**0.5
    best = float("inf")
    for _ in range(work.repeats):
        start = time.perf_counter()
        out = a
        for _ in range(work.products):
            out = out @ b
        best = min(best, time.perf_counter() - start)
    return best


def _torch_seconds(work: Workload, device: str) -> float:
    """The same on a PyTorch device, after a warm-up, waiting for the device before each clock reading."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(work.size, work.size, generator=generator).to(device)
    b = (torch.randn(work.size, work.size, generator=generator) / work.size**0.5).to(device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    (a @ b).sum().item()  # warm-up: kernels chosen and loaded outside the clock
    best = float("inf")
    for _ in range(work.repeats):
        sync()
        start = time.perf_counter()
        out = a
        for _ in range(work.products):
            out = out @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _workload_seconds(device: str | None) -> float:
    """The workload's time where the experiments run: the accelerator's, else the CPU's."""
    if device is None:
        return _numpy_seconds(CPU_WORKLOAD)
    return _torch_seconds(ACCELERATOR_WORKLOAD, device)


def score_of(device: str | None, seconds: float) -> float:
    """The rate of the device's workload done in `seconds`, over the reference's."""
    work = CPU_WORKLOAD if device is None else ACCELERATOR_WORKLOAD
    return round(work.flops / seconds / REFERENCE_FLOPS, 4)


def _accelerator_name() -> str:
    """The GPU's name when PyTorch sees one, else the CPU model."""
    from nightlab.hardware import accelerator

    if accelerator() == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    cpuinfo = Path("/proc/cpuinfo")
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
    return model.group(1).strip() if model else platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def machine_id(accelerator: str) -> str:
    """Stable per host and hardware: the same machine posts under the same id every night."""
    return hashlib.sha256(f"{platform.node()}|{accelerator}".encode()).hexdigest()[:16]


def calibrate(cache: Path | None = None, refresh: bool = False) -> Calibration:
    """This machine's calibration, measured once, then read from `cache` (default: nightlab's cache dir)."""
    from nightlab.hardware import accelerator

    device = accelerator()
    workload = (CPU_WORKLOAD if device is None else ACCELERATOR_WORKLOAD).describe(device or "cpu")
    path = (cache or cache_dir()) / "hub_calibration.json"
    if path.exists() and not refresh:
        stored = json.loads(path.read_text())
        if stored.get("workload") == workload:
            return Calibration(**stored)
    name = _accelerator_name()
    result = Calibration(
        machine_id=machine_id(name),
        accelerator=name,
        memory_gb=_memory_gb(),
        score=score_of(device, _workload_seconds(device)),
        workload=workload,
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(result)))
    except OSError:
        pass  # a read-only cache only costs a re-measure next time
    return result


def is_time_like(metric_name: str) -> bool:
    return bool(TIME_LIKE.search(metric_name))


def normalise(metric_name: str, value: float, score: float) -> float:
    """`value` as the reference machine would have measured it (see the module docstring for the rule)."""
    return value * score if is_time_like(metric_name) else value
