"""A saved adapter on disk: PEFT-compatible weights and config, nightlab's metadata, optimizer moments.

The directory loads in PEFT as it is (`adapter_model.safetensors` + `adapter_config.json`); nightlab adds
`nightlab_adapter.json` (base model, LoRA spec, step count) and, when asked, `optimizer.pt` with the AdamW
moments keyed "<tensor>::<stat>". Directories are written beside their target and renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nightlab.train import models
from nightlab.train.errors import EngineError
from nightlab.train.lora import Adapter, LoadedBase

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "nightlab_adapter.json"
OPTIMIZER_STATE = "optimizer.pt"
META_FORMAT = 1


@dataclass
class Snapshot:
    """An adapter's state copied to the CPU, so writing it needs no lock on the base."""

    weights: dict[str, torch.Tensor]
    config: Any  # the slot's PEFT LoraConfig
    meta: dict[str, Any]
    optimizer_state: dict[str, torch.Tensor] | None


def snapshot(adapter: Adapter, with_optimizer: bool) -> Snapshot:
    """Copy an adapter's weights (and optimizer moments) off the device; the caller holds the base's lock."""
    base = adapter.base
    weights = {key: p.detach().to("cpu", copy=True).contiguous() for key, p in adapter.params.items()}
    optimizer_state: dict[str, torch.Tensor] | None = None
    if with_optimizer:
        optimizer_state = {
            f"{key}::{stat}": value.detach().to("cpu", copy=True)
            for key, param in adapter.params.items()
            for stat, value in adapter.optimizer.state.get(param, {}).items()
        }
    meta = {
        "format": META_FORMAT,
        "base_model": base.info.name,
        "lora": asdict(adapter.lora),
        "steps": adapter.steps,
        "with_optimizer": with_optimizer,
    }
    return Snapshot(weights, base.peft.peft_config[adapter.slot], meta, optimizer_state)


def write(directory: Path, snap: Snapshot) -> None:
    from safetensors.torch import save_file

    with models.atomic_dir(Path(directory)) as tmp:
        save_file(snap.weights, str(tmp / ADAPTER_WEIGHTS))
        snap.config.save_pretrained(str(tmp))
        if snap.optimizer_state is not None:
            torch.save(snap.optimizer_state, tmp / OPTIMIZER_STATE)
        (tmp / ADAPTER_META).write_text(json.dumps(snap.meta, indent=2))


def read_meta(directory: Path) -> dict[str, Any]:
    """nightlab's metadata of a checkpoint; refuses a directory that is not a nightlab adapter."""
    meta_path = Path(directory) / ADAPTER_META
    if not meta_path.is_file() or not (Path(directory) / ADAPTER_WEIGHTS).is_file():
        raise EngineError(f"{directory} is not a nightlab adapter checkpoint (no {ADAPTER_META})")
    return json.loads(meta_path.read_text())


def weights_version(directory: Path) -> int:
    """Changes whenever the weights file is rewritten, so a cached copy of older weights is not reused."""
    return (Path(directory) / ADAPTER_WEIGHTS).stat().st_mtime_ns


def load_weights(base: LoadedBase, slot: str, directory: Path) -> None:
    """Load a checkpoint's weights into `slot`; refuses weights that do not fit its tensors."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / ADAPTER_WEIGHTS), device=base.device)
    result = set_peft_model_state_dict(base.peft, state, adapter_name=slot)
    missing = [k for k in result.missing_keys if f".{slot}." in k]
    if missing or result.unexpected_keys:
        raise EngineError(
            f"checkpoint {directory} does not fit this adapter "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )


def has_optimizer_state(directory: Path) -> bool:
    return (Path(directory) / OPTIMIZER_STATE).is_file()


def load_optimizer_state(adapter: Adapter, directory: Path) -> None:
    """Put a checkpoint's AdamW moments back on the adapter's tensors; the caller holds the base's lock."""
    state = torch.load(Path(directory) / OPTIMIZER_STATE, map_location=adapter.base.device, weights_only=True)
    for key, param in adapter.params.items():
        stats = {k.split("::", 1)[1]: v for k, v in state.items() if k.split("::", 1)[0] == key}
        if stats:
            if "step" in stats:
                stats["step"] = stats["step"].cpu()  # AdamW keeps its step count on the CPU
            adapter.optimizer.state[param] = stats
