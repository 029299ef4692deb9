"""How fast this machine is, as one number, so results from different hardware compare on one scale.

The score is `REFERENCE_SECONDS / measured seconds` of a fixed workload (float32 matrix products: what
training steps spend their time on), so the reference machine scores 1.0 and a machine twice as fast scores
2.0. It runs once per machine (a few seconds) and is cached in nightlab's cache dir.

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

WORKLOAD = "float32 matmul 384x384, 40 products, best of 3"
REFERENCE_SECONDS = 0.05
TIME_LIKE = re.compile(r"(seconds|time|latency|(^|_)ms($|_)|(^|_)s$)", re.IGNORECASE)


@dataclass(frozen=True)
class Calibration:
    machine_id: str
    accelerator: str
    memory_gb: float
    score: float
    workload: str = WORKLOAD


def _workload_seconds(size: int = 384, products: int = 40, repeats: int = 3) -> float:
    """Best-of-`repeats` time of a fixed chain of matrix products (the best: a busy moment must not count)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32) / size**0.5
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = a
        for _ in range(products):
            out = out @ b
        best = min(best, time.perf_counter() - start)
    return best


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
    path = (cache or cache_dir()) / "hub_calibration.json"
    if path.exists() and not refresh:
        stored = json.loads(path.read_text())
        if stored.get("workload") == WORKLOAD:
            return Calibration(**stored)
    name = _accelerator_name()
    result = Calibration(
        machine_id=machine_id(name),
        accelerator=name,
        memory_gb=_memory_gb(),
        score=round(REFERENCE_SECONDS / _workload_seconds(), 4),
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
