"""What accelerator this machine has and what it can do: the one place nightlab and its templates ask.

`accelerator()` works without PyTorch (the loop picks a time budget with it, and must start fast); the other
functions import torch when called.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Dense bf16 peak of common GPUs, matched against the device name in order (so "H100 PCIe" before "H100").
GPU_PEAK_TFLOPS = (
    ("GH200", 989),
    ("H200", 989),
    ("H100 PCIe", 756),
    ("H100", 989),
    ("B200", 2250),
    ("A100", 312),
    ("L40S", 362),
    ("L40", 181),
    ("L4", 121),
    ("RTX 6000 Ada", 364),
    ("A6000", 155),
    ("4090", 165),
    ("3090", 71),
    ("V100", 125),
    ("T4", 65),
)


def pick_device(requested: str = "auto") -> torch.device:
    """`requested` as a torch device; "auto" is the fastest one present: cuda, then mps, then cpu."""
    import torch

    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def accelerator() -> str | None:
    """'cuda' or 'mps' when PyTorch sees one, else None (also when PyTorch is not installed)."""
    try:
        device = pick_device()
    except ImportError:
        return None
    return None if device.type == "cpu" else device.type


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 is the fast path: a CUDA GPU with native bf16 (compute capability 8.0+;
    is_bf16_supported() also counts older GPUs that emulate it), or a CPU with AMX / AVX-512 BF16 (elsewhere
    bf16 is emulated and many times slower than fp32). Decided from the hardware, never from a timing, so it
    never flips."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        cpuinfo = Path("/proc/cpuinfo")
        flags = set(re.findall(r"\w+", cpuinfo.read_text())) if cpuinfo.exists() else set()
        return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def _device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses; the type for anything else."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        cpuinfo = Path("/proc/cpuinfo")
        text = cpuinfo.read_text() if cpuinfo.exists() else ""
        model = re.search(r"model name\s*:\s*(.+)", text)
        return f"{model.group(1).strip() if model else 'cpu'} x{torch.get_num_threads()} threads"
    return device.type


def peak_flops(device: torch.device, dtype: torch.dtype, cache: Path, refresh: bool = False) -> float:
    """FLOP/s the device can reach for matmuls in `dtype` (for MFU): the table for known GPUs, else measured
    once and kept in the `cache` folder (`refresh` measures again, so a probe taken on a busy machine does not
    stick)."""
    import torch

    name = _device_name(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        for pattern, tflops in GPU_PEAK_TFLOPS:
            if pattern in name:
                return tflops * 1e12
    dtype_name = str(dtype).removeprefix("torch.")
    path = cache / (re.sub(r"[^A-Za-z0-9]+", "_", f"{name}_{dtype_name}") + ".json")
    if path.exists() and not refresh:
        return json.loads(path.read_text())["flops"]
    flops = _probe_matmul(device, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": name, "dtype": dtype_name, "flops": flops}))
    except OSError:
        pass  # a read-only cache (e.g. inside a sandbox) only costs a re-measure next time
    return flops


def _probe_matmul(device: torch.device, dtype: torch.dtype) -> float:
    import torch

    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = math.inf, time.perf_counter() + 2.0
    for _ in range(10):  # the best of a few timings, within about two seconds
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timing around it is real."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
