"""Quantized base models (QLoRA): which schemes this device can run, and how transformers loads them.

bitsandbytes does both schemes on CUDA and on CPU (0.49+): nf4 is QLoRA's 4-bit NormalFloat with
double-quantized block scales, int8 is LLM.int8(). Whether a scheme works is decided by running it, not by
a table: one small quantized linear layer is built on the device and trained for a step, so an error names
the real cause (no library, no kernel for this device) and the schemes that do work.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any, Literal

from nightlab.errors import NightlabError

Scheme = Literal["none", "nf4", "int8"]
SCHEMES: tuple[Scheme, ...] = ("none", "nf4", "int8")
INSTALL_HINT = "pip install 'nightlab[quant]'"


class QuantizationError(NightlabError, ValueError):
    """A scheme that does not exist, or that this device cannot run."""


def check_scheme(name: str) -> Scheme:
    """`name` as a scheme, or an error listing the schemes."""
    if name not in SCHEMES:
        raise QuantizationError(f"unknown quantization {name!r}: one of {', '.join(SCHEMES)}")
    return name  # type: ignore[return-value]


def compute_dtype(device: str) -> Any:
    """What quantized layers compute in: bf16 on GPUs with native bf16, fp32 elsewhere (CPU bf16 is emulated
    on most CPUs, and the sampler's logprobs must match the trainer's)."""
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@cache
def unavailable_reason(scheme: Scheme, device: str) -> str | None:
    """Why `scheme` cannot run on `device`, or None when a quantized layer trains there."""
    import torch

    if scheme == "none":
        return None
    try:
        # with AVX512-BF16 it warns at import that an optional CPU kernel (fetched from the hub) is missing
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError:
        return f"bitsandbytes is not installed ({INSTALL_HINT})"
    try:
        if scheme == "nf4":
            layer = bnb.nn.Linear4bit(
                64, 64, bias=False, compute_dtype=compute_dtype(device), quant_type="nf4"
            ).to(device)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(device)
        x = torch.randn(2, 64, device=device, dtype=compute_dtype(device), requires_grad=True)
        layer(x).float().sum().backward()
    except Exception as error:  # any failure of the library on this device means: not here
        return f"bitsandbytes {bnb.__version__} cannot run it on {device}: {type(error).__name__}: {error}"
    return None


def available(device: str) -> list[Scheme]:
    return [scheme for scheme in SCHEMES if unavailable_reason(scheme, device) is None]


def require(scheme: Scheme, device: str) -> None:
    """Refuse a scheme this device cannot run, saying why and which schemes it can."""
    reason = unavailable_reason(scheme, device)
    if reason is not None:
        raise QuantizationError(
            f"{scheme} quantization is unavailable on {device}: {reason}; "
            f"available here: {', '.join(available(device))}"
        )


def load_kwargs(scheme: Scheme, device: str) -> dict[str, Any]:
    """`from_pretrained` arguments that load a base quantized onto `device` (an empty dict for "none")."""
    if scheme == "none":
        return {}
    require(scheme, device)
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(device)
    if scheme == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": device}, "dtype": dtype}
