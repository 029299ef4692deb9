"""The training engine: one copy of each base model, many LoRA adapters on it, and the Tinker training verbs.

Adapters live side by side in one PEFT model per base and are switched per request, so N training clients cost
one base plus N adapters. All work on a base runs under that base's lock, in arrival order; the API layer
calls these synchronous methods from worker threads. The pieces live beside it: `lora` (adapters on a base),
`forward` (checking data, microbatches, losses), `adapter_files` (checkpoints on disk), `records` (what the
engine takes and returns).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nightlab import hardware
from nightlab.train import adapter_files, forward, losses, models, planner
from nightlab.train.errors import EngineError, LossError, SamplingInputError
from nightlab.train.lora import Adapter, LoadedBase, lora_config, lora_targets, tensor_layout
from nightlab.train.quantize import QuantizationError, check_scheme
from nightlab.train.records import (
    AdamParams,
    Datum,
    EngineStats,
    ForwardBackwardResult,
    LoraSpec,
    ModelInfo,
    Precision,
)
from nightlab.train.vision import vision_of

if TYPE_CHECKING:
    from nightlab.train.sampling import SampleRequest, SampleResult

__all__ = [
    "AdamParams",
    "Datum",
    "Engine",
    "EngineError",
    "EngineStats",
    "ForwardBackwardResult",
    "LoraSpec",
    "ModelInfo",
]

SAMPLER_ADAPTERS_CACHED = 4  # checkpoints kept loaded for sampling, per base


class Engine:
    """Base models loaded once, LoRA adapters on them, and the Tinker verbs that train and sample them."""

    def __init__(
        self,
        data_dir: Path,
        device: str = "auto",
        preload: list[str] | tuple[str, ...] = (),
        precision: Precision = "auto",
        show_progress: bool = True,
        quantization: Mapping[str, str] | None = None,
        memory_limit: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.device = (hardware.accelerator() or "cpu") if device == "auto" else device
        # scheme by served name; a base is refused when the planner says it will not fit `memory_limit` bytes
        # (None: what the device has free when it loads)
        self.quantization = {
            models.resolve(name, self.data_dir).name: check_scheme(scheme)
            for name, scheme in (quantization or {}).items()
        }
        self.memory_limit = memory_limit
        self.precision = precision
        self.show_progress = show_progress
        self._bases: OrderedDict[str, LoadedBase] = OrderedDict()  # least recently used first
        self._adapters: dict[str, Adapter | None] = {}  # None: id reserved while its adapter is built
        self._lock = threading.Lock()  # guards the two dicts above and the load locks
        self._catalog: models.ModelCatalog | None = None  # None: any local model or hub id (library use)
        self.max_loaded_bases: int | None = None  # None: never unload a base
        self._load_locks: dict[str, threading.Lock] = {}
        self._slots = itertools.count()
        self._sample_calls = 0
        self._sampled_requests = 0
        for name in preload:
            self._base(name)

    # -- models --

    def serve_only(self, allowed: Iterable[str], max_loaded_bases: int | None = None) -> None:
        """From now on take only servable model names: the prepared models, `allowed`, and the bases loaded so
        far (a server's preloads). Keep at most `max_loaded_bases` bases in memory."""
        with self._lock:
            loaded = list(self._bases)
        self._catalog = models.ModelCatalog(self.data_dir, [*allowed, *loaded])
        self.max_loaded_bases = max_loaded_bases
        with self._lock:
            self._evict_idle()

    def _resolve(self, name: str) -> models.ResolvedModel:
        try:
            if self._catalog is not None:
                return self._catalog.find(name)
            return models.resolve(name, self.data_dir)
        except models.UnknownModelError as error:
            raise EngineError(str(error)) from None

    def _base(self, name: str) -> LoadedBase:
        resolved = self._resolve(name)
        with self._lock:
            if resolved.name in self._bases:
                self._bases.move_to_end(resolved.name)
                return self._bases[resolved.name]
            load_lock = self._load_locks.setdefault(resolved.name, threading.Lock())
        with load_lock:
            with self._lock:
                if resolved.name in self._bases:
                    return self._bases[resolved.name]
            base = self._load_base(name, resolved)
            with self._lock:
                self._bases[resolved.name] = base
                self._evict_idle()
            return base

    def _evict_idle(self) -> None:
        """Unload the least recently used bases past `max_loaded_bases`, never the newest nor one that
        training clients use; work already running on an evicted base finishes on it, and the next request
        loads it again. The caller holds `_lock`."""
        if self.max_loaded_bases is None:
            return
        newest = next(reversed(self._bases), None)
        in_use = {adapter.base.info.name for adapter in self._adapters.values() if adapter is not None}
        idle = [name for name in self._bases if name not in in_use and name != newest]
        for name in idle[: len(self._bases) - self.max_loaded_bases]:
            del self._bases[name]

    def loaded(self) -> list[str]:
        """Names of the bases in memory, least recently used first."""
        with self._lock:
            return list(self._bases)

    def _load_base(self, name: str, resolved: models.ResolvedModel) -> LoadedBase:
        scheme = self.quantization.get(resolved.name, "none")
        try:
            planner.check_fits(resolved, scheme, self.device, self.memory_limit)
            model, tokenizer, tokenizer_id = models.load(
                resolved,
                self.data_dir,
                device=self.device,
                show_progress=self.show_progress,
                quantization=scheme,
            )
        except (OSError, planner.PlanError, QuantizationError) as error:
            raise EngineError(f"cannot load model {name!r}: {error}") from None
        model.requires_grad_(False)
        config = model.config
        info = ModelInfo(
            name=resolved.name,
            tokenizer_id=tokenizer_id,
            arch=config.model_type,
            max_context_length=models.context_length(config),
        )
        autocast = forward.pick_autocast(self.device, self.precision)
        vision = vision_of(model, tokenizer_id)
        info.image_token_id = vision.image_token_id if vision is not None else None
        return LoadedBase(info, model, tokenizer, self.device, autocast, lora_targets(model), vision=vision)

    def models(self) -> list[ModelInfo]:
        """Servable base models: the loaded ones and every prepared or allowed one, without loading them."""
        with self._lock:
            infos = {name: base.info for name, base in self._bases.items()}
        servable = self._catalog.servable().values() if self._catalog else models.list_prepared(self.data_dir)
        for resolved in servable:
            if resolved.name in infos:
                continue
            arch, context = models.describe(resolved)
            tokenizer_id = (
                str(models.gguf_tokenizer_dir(resolved, self.data_dir))
                if resolved.source == "gguf"
                else resolved.name
            )
            infos[resolved.name] = ModelInfo(resolved.name, tokenizer_id, arch, context)
        return list(infos.values())

    def model_info(self, name: str) -> ModelInfo:
        return self._base(name).info

    def canonical_name(self, name: str) -> str:
        """The name a model is known by once loaded (aliases, relative paths resolved), without loading it."""
        return self._resolve(name).name

    def stats(self) -> EngineStats:
        with self._lock:
            bases = list(self._bases.values())
            return EngineStats(
                training_adapters=len(self._adapters),
                sampler_adapters=sum(len(b.samplers) for b in bases),
                sample_calls=self._sample_calls,
                sampled_requests=self._sampled_requests,
            )

    def tokenizer(self, base_model: str):
        return self._base(base_model).tokenizer

    # -- adapters --

    def _adapter(self, model_id: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.get(model_id)
        if adapter is None:
            raise EngineError(f"unknown model_id {model_id!r}: create it or load a checkpoint first")
        return adapter

    def _add_slot(self, base: LoadedBase, config, seed: int | None) -> str:
        """Add an adapter to the base under a fresh slot name, and return the name."""
        slot = f"a{next(self._slots)}"
        base.add_slot(slot, config, seed)
        return slot

    def create_adapter(self, model_id: str, base_model: str, lora: LoraSpec) -> None:
        base = self._base(base_model)
        config = lora_config(base, lora)
        with self._lock:
            if model_id in self._adapters:
                raise EngineError(f"model_id {model_id!r} already exists")
            self._adapters[model_id] = None
        try:
            with base.lock:
                slot = self._add_slot(base, config, lora.seed)
                params = base.slot_params(slot)
                optimizer = torch.optim.AdamW(list(params.values()), lr=AdamParams.learning_rate)
            adapter = Adapter(model_id, base, slot, lora, params, optimizer)
        except BaseException:
            with self._lock:
                self._adapters.pop(model_id, None)
            raise
        with self._lock:
            self._adapters[model_id] = adapter
            self._bases.setdefault(base.info.name, base)  # evicted while the adapter was built: in use again

    def adapter_info(self, model_id: str) -> tuple[str, LoraSpec]:
        adapter = self._adapter(model_id)
        return adapter.base.info.name, adapter.lora

    def drop_adapter(self, model_id: str) -> None:
        adapter = self._adapter(model_id)
        with adapter.base.lock:
            adapter.base.remove_slot(adapter.slot)
        with self._lock:
            self._adapters.pop(model_id, None)
            self._evict_idle()

    # -- training --

    def forward_backward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str] | None,
        forward_only: bool = False,
    ) -> ForwardBackwardResult:
        """Loss and per-token logprobs of `data`; unless forward_only, adds the gradients to the adapter's
        (they accumulate across calls until optim_step). A bad datum refuses the whole request."""
        adapter = self._adapter(model_id)
        base = adapter.base
        if not data:
            raise EngineError("forward_backward needs at least one datum")
        try:
            config = losses.resolve_config(loss_fn, loss_fn_config)
        except LossError as error:
            raise EngineError(str(error)) from None
        checked = [
            forward.check_datum(i, d, base.vocab_size, loss_fn, base.vision) for i, d in enumerate(data)
        ]
        with base.lock, torch.no_grad() if forward_only else nullcontext():
            base.peft.set_adapter(adapter.slot)
            return forward.run_losses(base, checked, loss_fn, config, backward=not forward_only)

    def optim_step(self, model_id: str, adam: AdamParams) -> dict[str, float]:
        """One AdamW step (decoupled weight decay, optional global-norm clipping) on the accumulated grads."""
        adapter = self._adapter(model_id)
        if adam.learning_rate < 0 or not (0 <= adam.beta1 < 1 and 0 <= adam.beta2 < 1) or adam.eps < 0:
            raise EngineError(f"invalid Adam parameters: {adam}")
        with adapter.base.lock:
            params = list(adapter.params.values())
            max_norm = adam.grad_clip_norm if adam.grad_clip_norm > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            for group in adapter.optimizer.param_groups:
                group.update(
                    lr=adam.learning_rate,
                    betas=(adam.beta1, adam.beta2),
                    eps=adam.eps,
                    weight_decay=adam.weight_decay,
                )
            adapter.optimizer.step()
            adapter.optimizer.zero_grad(set_to_none=True)
            adapter.steps += 1
        return {
            "grad_norm:mean": grad_norm,
            "learning_rate:mean": adam.learning_rate,
            "step:max": adapter.steps,
        }

    # -- checkpoints --

    def save_adapter(self, model_id: str, directory: Path, with_optimizer: bool) -> None:
        """A PEFT-compatible adapter directory plus nightlab metadata and, if asked, the optimizer moments."""
        adapter = self._adapter(model_id)
        with adapter.base.lock:
            snapshot = adapter_files.snapshot(adapter, with_optimizer)
        adapter_files.write(directory, snapshot)

    def _check_trained_on(self, base: LoadedBase, meta: dict[str, Any], directory: Path) -> None:
        """Refuse a checkpoint (its metadata `meta`) that was trained on another base model."""
        if self._resolve(meta["base_model"]).name != base.info.name:
            raise EngineError(
                f"checkpoint {directory} was trained on {meta['base_model']}, not {base.info.name}"
            )

    def load_adapter(self, model_id: str, base_model: str, directory: Path, with_optimizer: bool) -> None:
        """Create `model_id` (or overwrite its weights) from a checkpoint; optimizer moments too if asked."""
        meta = adapter_files.read_meta(directory)
        base = self._base(base_model)
        self._check_trained_on(base, meta, directory)
        if with_optimizer and not adapter_files.has_optimizer_state(directory):
            raise EngineError(f"checkpoint {directory} has no optimizer state; load it without the optimizer")
        lora = LoraSpec(**meta["lora"])
        with self._lock:
            exists = model_id in self._adapters
        if exists:
            adapter = self._adapter(model_id)
            if adapter.base is not base or tensor_layout(adapter.lora) != tensor_layout(lora):
                raise EngineError(
                    f"checkpoint {directory} ({lora}) does not fit model_id {model_id!r} ({adapter.lora})"
                )
        else:
            self.create_adapter(model_id, base_model, lora)
            adapter = self._adapter(model_id)
        with base.lock:
            adapter_files.load_weights(base, adapter.slot, directory)
            adapter.optimizer.state.clear()
            adapter.optimizer.zero_grad(set_to_none=True)
            adapter.steps = int(meta.get("steps", 0))
            if with_optimizer:
                adapter_files.load_optimizer_state(adapter, directory)

    # -- sampling --

    def _sampler_slot(self, base: LoadedBase, directory: Path) -> str:
        """The PEFT name of a checkpoint loaded for sampling; loaded on first use, least recent evicted."""
        from peft import LoraConfig

        directory = Path(directory).resolve()
        self._check_trained_on(base, adapter_files.read_meta(directory), directory)
        key = (str(directory), adapter_files.weights_version(directory))
        if key in base.samplers:
            base.samplers.move_to_end(key)
            return base.samplers[key]
        slot = self._add_slot(base, LoraConfig.from_pretrained(str(directory)), seed=0)
        try:
            adapter_files.load_weights(base, slot, directory)
        except BaseException:
            base.remove_slot(slot)
            raise
        base.samplers[key] = slot
        while len(base.samplers) > SAMPLER_ADAPTERS_CACHED:
            _, evicted = base.samplers.popitem(last=False)
            base.remove_slot(evicted)
        return slot

    def forget_samplers(self, under: Path) -> None:
        """Unload the sampling adapters of checkpoints inside `under` (weights about to be deleted)."""
        root = Path(under).resolve()
        with self._lock:
            bases = list(self._bases.values())
        for base in bases:
            with base.lock:
                for key in [k for k in base.samplers if Path(k[0]).is_relative_to(root)]:
                    base.remove_slot(base.samplers.pop(key))

    def check_sample(self, base_model: str, request: SampleRequest) -> None:
        """Refuse a sampling request the model can never serve (token ids outside its vocabulary, a prompt
        plus max_tokens beyond its context, bad parameters) before it joins a batch."""
        from nightlab.train import sampling

        base = self._base(base_model)
        try:
            expanded = sampling.with_images(request, base.vision)
            sampling.validate(expanded, base.vocab_size, base.info.max_context_length or None)
        except SamplingInputError as error:
            raise EngineError(str(error)) from None

    def sample(
        self, base_model: str, adapter_dir: Path | None, requests: list[SampleRequest]
    ) -> list[SampleResult]:
        """Generate for `requests` from the base model alone, or with the checkpoint in `adapter_dir` on it.
        `adapter_dir` may be a symlink: it is resolved on each call (inflight sampler weights move)."""
        from nightlab.train import sampling

        base = self._base(base_model)
        with self._lock:
            self._sample_calls += 1
            self._sampled_requests += len(requests)
        try:
            with base.lock:
                if adapter_dir is None:
                    with base.peft.disable_adapter() if base.peft is not None else nullcontext():
                        return sampling.generate(
                            base.model, base.tokenizer, requests, base.autocast, base.vision
                        )
                slot = self._sampler_slot(base, adapter_dir)  # first, as it may wrap the base into base.peft
                base.peft.set_adapter(slot)
                return sampling.generate(base.model, base.tokenizer, requests, base.autocast, base.vision)
        except SamplingInputError as error:
            raise EngineError(str(error)) from None
