"""What accelerator this machine has, for settings that differ between a CPU and a GPU (e.g. the time budget)."""

from __future__ import annotations


def accelerator() -> str | None:
    """'cuda' or 'mps' when PyTorch sees one, else None (also when PyTorch is not installed)."""
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return None
