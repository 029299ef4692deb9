"""LoRA adapters on one loaded base model: which layers they train, and how each is added and removed.

All adapters of a base live side by side in one PEFT model, each under its own slot name, and are switched per
request; the PEFT wrapper exists only while at least one slot does. Callers hold the base's lock.
"""

from __future__ import annotations

import random
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nightlab.train.errors import EngineError
from nightlab.train.records import LoraSpec, ModelInfo
from nightlab.train.vision import Vision

LORA_ALPHA = 32  # PEFT scales the update by alpha / rank
TARGET_GROUPS = {  # module-name parts that put a linear layer in LoraSpec's attn or mlp group
    "attn": {"self_attn", "attn", "attention", "self_attention", "cross_attn"},
    "mlp": {"mlp", "feed_forward", "ffn", "block_sparse_moe", "experts"},
}
VISION_PARTS = {"visual", "vision_tower", "vision_model", "multi_modal_projector"}  # image-encoder modules


@dataclass
class LoadedBase:
    """One base model loaded once, with the PEFT wrapper its adapters share."""

    info: ModelInfo
    model: Any  # the HF model; wrapped into a PeftModel by the first adapter
    tokenizer: Any
    device: str
    autocast: torch.dtype | None
    targets: dict[str, list[str]]  # LoRA targets by group: see lora_targets
    lock: threading.RLock = field(default_factory=threading.RLock)
    peft: Any = None
    samplers: OrderedDict[tuple[str, int], str] = field(default_factory=OrderedDict)  # checkpoint -> slot
    vision: Vision | None = None  # how a vision-language base takes images; None: text only

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def add_slot(self, slot: str, config: Any, seed: int | None) -> None:
        """Add an adapter named `slot` from a PEFT LoraConfig, wrapping the base on first use."""
        from peft import get_peft_model

        with _seeded(seed, self.device), warnings.catch_warnings():
            # LoRA on a tied lm_head adds its delta to the output side only, which is what we want here
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            if self.peft is None:
                self.peft = get_peft_model(self.model, config, adapter_name=slot)
            else:
                self.peft.add_adapter(slot, config)
        self.peft.eval()  # no dropout anywhere: forward passes are deterministic

    def remove_slot(self, slot: str) -> None:
        # PEFT warns when the active adapter goes; the next request sets its own
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self.peft.delete_adapter(slot)
        if not self.peft.peft_config:  # the last one: PEFT would keep its name as active, so unwrap the base
            self.model = self.peft.unload()
            self.peft = None

    def slot_params(self, slot: str) -> dict[str, nn.Parameter]:
        """The slot's tensors, keyed like PEFT's adapter state dict (slot name removed), made trainable."""
        marker = f".{slot}."
        params = {
            name.replace(marker, "."): param for name, param in self.peft.named_parameters() if marker in name
        }
        for param in params.values():
            param.requires_grad_(True)
        return params


@dataclass
class Adapter:
    """A training client's adapter: its slot on the base, its tensors and their optimizer."""

    model_id: str
    base: LoadedBase
    slot: str  # the PEFT adapter name; model ids may hold characters PEFT module names cannot
    lora: LoraSpec
    params: dict[str, nn.Parameter]  # keyed like PEFT's adapter state dict (slot name removed)
    optimizer: torch.optim.AdamW
    steps: int = 0


def lora_targets(model: nn.Module) -> dict[str, list[str]]:
    """What LoRA can train, grouped the way LoraSpec switches it: linear layers by module name (attn, mlp,
    unembed), and by parameter name the fused 3-D expert weights of MoE layers (experts: train_mlp switches
    them too, as Tinker's train_mlp covers MoE layers), where PEFT gives each expert its own rank-r factors.

    Routers stay frozen, as Tinker's LoraConfig has no knob for them: a router that is a linear layer is a
    direct child of its MoE block (the module holding `experts`), while expert layers sit inside `experts`.
    """
    from transformers.pytorch_utils import Conv1D

    unembed = model.get_output_embeddings()
    routers = {
        child
        for block in model.modules()
        if isinstance(getattr(block, "experts", None), nn.Module)
        for child in block.children()
        if isinstance(child, nn.Linear | Conv1D)
    }
    groups: dict[str, list[str]] = {"attn": [], "mlp": [], "experts": [], "unembed": []}
    for name, module in model.named_modules():
        parts = set(name.split("."))
        if parts & VISION_PARTS:  # LoRA trains the language model; a VLM's vision tower stays as it is
            continue
        if "experts" in parts:
            groups["experts"] += [
                f"{name}.{key}" for key, p in module.named_parameters(recurse=False) if p.ndim == 3
            ]
        if not isinstance(module, nn.Linear | Conv1D) or module in routers:
            continue
        if module is unembed:
            groups["unembed"].append(name)
        elif parts & TARGET_GROUPS["attn"]:
            groups["attn"].append(name)
        elif parts & TARGET_GROUPS["mlp"]:
            groups["mlp"].append(name)
    return groups


def tensor_layout(lora: LoraSpec) -> tuple[int, bool, bool, bool]:
    """What decides which tensors an adapter has (the seed only decides their initial values)."""
    return lora.rank, lora.train_attn, lora.train_mlp, lora.train_unembed


def lora_config(base: LoadedBase, lora: LoraSpec) -> Any:
    """The PEFT LoraConfig for `lora` on this base; refuses a bad rank, or layers that train nothing."""
    from peft import LoraConfig

    if not isinstance(lora.rank, int) or lora.rank < 1:
        raise EngineError(f"LoRA rank must be a positive integer, got {lora.rank!r}")
    wanted = {"attn": lora.train_attn, "mlp": lora.train_mlp, "unembed": lora.train_unembed}
    modules = [name for group, on in wanted.items() if on for name in base.targets[group]]
    parameters = base.targets["experts"] if lora.train_mlp else []
    if not modules and not parameters:
        raise EngineError(
            "LoRA config trains nothing: enable at least one of train_attn, train_mlp, train_unembed"
        )
    return LoraConfig(
        r=lora.rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=modules,
        target_parameters=parameters or None,
        task_type="CAUSAL_LM",
    )


@contextmanager
def _seeded(seed: int | None, device: str) -> Iterator[None]:
    """Seed LoRA's random init without disturbing anyone else's random stream."""
    devices = [torch.cuda.current_device()] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
        yield
