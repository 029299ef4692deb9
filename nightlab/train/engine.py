"""The training engine: one copy of each base model, many LoRA adapters on it, and the Tinker training verbs.

Adapters live side by side in one PEFT model per base and are switched per request, so N training clients cost
one base plus N adapters. All work on a base runs under that base's lock, in arrival order; the API layer calls
these synchronous methods from worker threads.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nightlab.train import losses, models

if TYPE_CHECKING:
    from nightlab.train.sampling import SampleRequest, SampleResult

LORA_ALPHA = 32  # PEFT scales the update by alpha / rank
TOKENS_PER_MICROBATCH = 4096  # padded tokens per forward; bounds the (tokens x vocab) fp32 logits in memory
SAMPLER_ADAPTERS_CACHED = 4  # checkpoints kept loaded for sampling, per base
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "nightlab_adapter.json"
OPTIMIZER_STATE = "optimizer.pt"

Precision = Literal["auto", "fp32", "bf16"]


@dataclass
class LoraSpec:
    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class Datum:
    tokens: list[int]  # model input (all token chunks concatenated)
    loss_fn_inputs: dict[str, np.ndarray]  # target_tokens (T,) or (T, K), weights, logprobs, advantages, ...


@dataclass
class ForwardBackwardResult:
    outputs: list[dict[str, np.ndarray]]  # per datum: "logprobs" always, "elementwise_loss"
    metrics: dict[str, float]  # "name:reduction"; always "loss:sum"


@dataclass
class EngineStats:
    """What the engine holds and has done, for tests, benchmarks and operators."""

    training_adapters: int  # adapters of live training clients
    sampler_adapters: int  # checkpoints loaded for sampling (a small cache per base)
    sample_calls: int  # sample() calls, each one batched generation
    sampled_requests: int  # requests those calls served


@dataclass
class ModelInfo:
    name: str
    tokenizer_id: str
    arch: str
    max_context_length: int


class EngineError(Exception):
    """A request the engine refuses ("User": the caller can fix it) or fails on ("Server")."""

    def __init__(self, message: str, category: Literal["User", "Server"] = "User") -> None:
        super().__init__(message)
        self.category = category


def pick_device(device: str = "auto") -> str:
    """ "auto" means the fastest accelerator present: cuda, then mps, then cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_autocast(device: str, precision: Precision) -> torch.dtype | None:
    """bf16 autocast for training where the hardware has fast bf16 matmuls; LoRA weights stay fp32 regardless."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if kind == "cpu":
        # AMX tiles make bf16 matmuls several times faster than fp32 on CPU; without them autocast only costs.
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return torch.bfloat16 if amx() else None
    return None


# --- one base model and the adapters on it ---


@dataclass
class _Adapter:
    model_id: str
    base: _Base
    slot: str  # the PEFT adapter name; model ids may hold characters PEFT module names cannot
    lora: LoraSpec
    params: dict[str, nn.Parameter]  # keyed like PEFT's adapter state dict (slot name removed)
    optimizer: torch.optim.AdamW
    steps: int = 0


@dataclass
class _Base:
    info: ModelInfo
    model: Any  # the HF model; wrapped into a PeftModel by the first adapter
    tokenizer: Any
    device: str
    autocast: torch.dtype | None
    targets: dict[str, list[str]]  # LoRA target module names by group: attn, mlp, unembed
    lock: threading.RLock = field(default_factory=threading.RLock)
    peft: Any = None
    samplers: OrderedDict[tuple[str, int], str] = field(default_factory=OrderedDict)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings


def _lora_targets(model: nn.Module) -> dict[str, list[str]]:
    """Names of the linear layers LoRA can train, grouped the way LoraSpec switches them."""
    from transformers.pytorch_utils import Conv1D

    unembed = model.get_output_embeddings()
    groups: dict[str, list[str]] = {"attn": [], "mlp": [], "unembed": []}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | Conv1D):
            continue
        parts = set(name.split("."))
        if module is unembed:
            groups["unembed"].append(name)
        elif parts & {"self_attn", "attn", "attention", "self_attention", "cross_attn"}:
            groups["attn"].append(name)
        elif parts & {"mlp", "feed_forward", "ffn", "block_sparse_moe"}:
            groups["mlp"].append(name)
    return groups


def _shape(lora: LoraSpec) -> tuple[int, bool, bool, bool]:
    """What decides which tensors an adapter has (the seed only decides their initial values)."""
    return lora.rank, lora.train_attn, lora.train_mlp, lora.train_unembed


def _lora_config(base: _Base, lora: LoraSpec):
    from peft import LoraConfig

    if not isinstance(lora.rank, int) or lora.rank < 1:
        raise EngineError(f"LoRA rank must be a positive integer, got {lora.rank!r}")
    wanted = {"attn": lora.train_attn, "mlp": lora.train_mlp, "unembed": lora.train_unembed}
    targets = [name for group, on in wanted.items() if on for name in base.targets[group]]
    if not targets:
        raise EngineError(
            "LoRA config trains nothing: enable at least one of train_attn, train_mlp, train_unembed"
        )
    return LoraConfig(
        r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
    )


@contextmanager
def _seeded(seed: int | None, device: str) -> Iterator[None]:
    """Seed LoRA's random init without disturbing anyone else's random stream."""
    devices = [torch.cuda.current_device()] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
        yield


# --- batches ---


def _as_array(value: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError:
        raise EngineError(f"{what} must be a rectangular numeric array") from None
    if array.dtype.kind not in "biuf":
        raise EngineError(f"{what} must be numeric, got dtype {array.dtype}")
    return array


def _check_tokens(array: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise EngineError(f"{what} must hold integer token ids")
        array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise EngineError(f"{what} holds ids outside the vocabulary [0, {vocab_size})")
    return array.astype(np.int64)


@dataclass
class _Checked:
    """One datum, validated: token and target arrays, and the float loss inputs."""

    tokens: np.ndarray
    targets: np.ndarray  # (T,) or (T, K)
    inputs: dict[str, np.ndarray]


def _check_datum(index: int, datum: Datum, vocab_size: int, loss_fn: str) -> _Checked:
    where = f"datum {index}"
    tokens = _check_tokens(_as_array(datum.tokens, f"{where}: tokens"), vocab_size, f"{where}: tokens")
    if tokens.ndim != 1 or tokens.size == 0:
        raise EngineError(f"{where}: tokens must be a non-empty 1-D list, got shape {tokens.shape}")
    if "target_tokens" not in datum.loss_fn_inputs:
        raise EngineError(f"{where}: loss_fn_inputs['target_tokens'] is missing")
    what = f"{where}: loss_fn_inputs['target_tokens']"
    targets = _check_tokens(_as_array(datum.loss_fn_inputs["target_tokens"], what), vocab_size, what)
    if targets.ndim not in (1, 2) or targets.shape[0] != tokens.size:
        raise EngineError(
            f"{what} must have shape (T,) or (T, K) with T = {tokens.size}, got {targets.shape}"
        )
    inputs = {
        key: _as_array(value, f"{where}: loss_fn_inputs[{key!r}]").astype(np.float32)
        for key, value in datum.loss_fn_inputs.items()
        if key != "target_tokens"
    }
    try:
        losses.check_inputs(loss_fn, targets.shape, {key: value.shape for key, value in inputs.items()})
    except losses.LossError as error:
        raise EngineError(f"{where}: {error}") from None
    return _Checked(tokens, targets, inputs)


def _microbatches(data: list[_Checked]) -> Iterator[list[int]]:
    """Consecutive datum indices whose padded batch stays within TOKENS_PER_MICROBATCH (at least one each)."""
    batch: list[int] = []
    longest = 0
    for i, datum in enumerate(data):
        longest_with = max(longest, datum.tokens.size)
        if batch and longest_with * (len(batch) + 1) > TOKENS_PER_MICROBATCH:
            yield batch
            batch, longest_with = [], datum.tokens.size
        batch.append(i)
        longest = longest_with
    if batch:
        yield batch


# --- the engine ---


class Engine:
    """Base models loaded once, LoRA adapters on them, and forward_backward / optim_step / save / load / sample."""

    def __init__(
        self,
        data_dir: Path,
        device: str = "auto",
        preload: list[str] | tuple[str, ...] = (),
        precision: Precision = "auto",
        show_progress: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.device = pick_device(device)
        self.precision = precision
        self.show_progress = show_progress
        self._bases: dict[str, _Base] = {}
        self._adapters: dict[str, _Adapter | None] = {}  # None: id reserved while its adapter is built
        self._lock = threading.Lock()  # guards the two dicts above and the load locks
        self._load_locks: dict[str, threading.Lock] = {}
        self._slots = itertools.count()
        self._sample_calls = 0
        self._sampled_requests = 0
        for name in preload:
            self._base(name)

    # -- models --

    def _resolve(self, name: str) -> models.ResolvedModel:
        try:
            return models.resolve(name, self.data_dir)
        except models.UnknownModelError as error:
            raise EngineError(str(error)) from None

    def _base(self, name: str) -> _Base:
        resolved = self._resolve(name)
        with self._lock:
            if resolved.name in self._bases:
                return self._bases[resolved.name]
            load_lock = self._load_locks.setdefault(resolved.name, threading.Lock())
        with load_lock:
            with self._lock:
                if resolved.name in self._bases:
                    return self._bases[resolved.name]
            try:
                model, tokenizer, tokenizer_id = models.load(
                    resolved, self.data_dir, device=self.device, show_progress=self.show_progress
                )
            except OSError as error:
                raise EngineError(f"cannot load model {name!r}: {error}") from None
            model.requires_grad_(False)
            config = model.config
            info = ModelInfo(
                name=resolved.name,
                tokenizer_id=tokenizer_id,
                arch=config.model_type,
                max_context_length=int(getattr(config, "max_position_embeddings", 0) or 0),
            )
            base = _Base(
                info,
                model,
                tokenizer,
                self.device,
                pick_autocast(self.device, self.precision),
                _lora_targets(model),
            )
            with self._lock:
                self._bases[resolved.name] = base
            return base

    def models(self) -> list[ModelInfo]:
        """Servable base models: the loaded ones and every prepared one, without loading weights."""
        with self._lock:
            infos = {name: base.info for name, base in self._bases.items()}
        for resolved in models.list_prepared(self.data_dir):
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
        """The name a model is known by once loaded (aliases and relative paths resolved), without loading it."""
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

    def _adapter(self, model_id: str) -> _Adapter:
        with self._lock:
            adapter = self._adapters.get(model_id)
        if adapter is None:
            raise EngineError(f"unknown model_id {model_id!r}: create it or load a checkpoint first")
        return adapter

    def _add_slot(self, base: _Base, config, seed: int | None) -> str:
        """Add an adapter to the base's PEFT model (wrapping the base on first use); returns its PEFT name."""
        from peft import get_peft_model

        slot = f"a{next(self._slots)}"
        with _seeded(seed, base.device), warnings.catch_warnings():
            # LoRA on a tied lm_head adds its delta to the output side only, which is what we want here
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            if base.peft is None:
                base.peft = get_peft_model(base.model, config, adapter_name=slot)
            else:
                base.peft.add_adapter(slot, config)
        base.peft.eval()  # no dropout anywhere: forward passes are deterministic
        return slot

    def _remove_slot(self, base: _Base, slot: str) -> None:
        with (
            warnings.catch_warnings()
        ):  # PEFT warns when the active adapter goes; the next request sets its own
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            base.peft.delete_adapter(slot)
        if not base.peft.peft_config:  # the last one: PEFT would keep its name as active, so unwrap the base
            base.model = base.peft.unload()
            base.peft = None

    def create_adapter(self, model_id: str, base_model: str, lora: LoraSpec) -> None:
        base = self._base(base_model)
        config = _lora_config(base, lora)
        with self._lock:
            if model_id in self._adapters:
                raise EngineError(f"model_id {model_id!r} already exists")
            self._adapters[model_id] = None
        try:
            with base.lock:
                slot = self._add_slot(base, config, lora.seed)
                marker = f".{slot}."
                params = {
                    name.replace(marker, "."): param
                    for name, param in base.peft.named_parameters()
                    if marker in name
                }
                for param in params.values():
                    param.requires_grad_(True)
                optimizer = torch.optim.AdamW(list(params.values()), lr=AdamParams.learning_rate)
            adapter = _Adapter(model_id, base, slot, lora, params, optimizer)
        except BaseException:
            with self._lock:
                self._adapters.pop(model_id, None)
            raise
        with self._lock:
            self._adapters[model_id] = adapter

    def adapter_info(self, model_id: str) -> tuple[str, LoraSpec]:
        adapter = self._adapter(model_id)
        return adapter.base.info.name, adapter.lora

    def drop_adapter(self, model_id: str) -> None:
        adapter = self._adapter(model_id)
        with adapter.base.lock:
            self._remove_slot(adapter.base, adapter.slot)
        with self._lock:
            self._adapters.pop(model_id, None)

    # -- training --

    def _logits(self, base: _Base, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """fp32 logits; under autocast only the transformer body runs in bf16, the unembedding stays fp32 so
        target logprobs (and importance ratios built on them) stay accurate."""
        model = base.peft.get_base_model()
        autocast = (
            torch.autocast(torch.device(base.device).type, dtype=base.autocast)
            if base.autocast
            else nullcontext()
        )
        config = model.config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            with autocast:
                return model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).logits.float()
        body = getattr(model, model.base_model_prefix)
        with autocast:
            hidden = body(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        head = model.get_output_embeddings()
        return head(hidden.to(head.weight.dtype)).float()

    def _target_logprobs(self, base: _Base, batch: list[_Checked]) -> list[torch.Tensor]:
        """log p(target) per datum: position i of the input predicts targets[i]; (T,) or (T, K) each."""
        length = max(d.tokens.size for d in batch)
        width = max(1 if d.targets.ndim == 1 else d.targets.shape[1] for d in batch)
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), length, dtype=torch.long)
        targets = torch.zeros(len(batch), length, width, dtype=torch.long)
        for row, datum in enumerate(batch):
            size = datum.tokens.size
            input_ids[row, :size] = torch.from_numpy(datum.tokens)
            attention_mask[row, :size] = 1
            target = torch.from_numpy(datum.targets)
            targets[row, :size, : (1 if target.dim() == 1 else target.shape[1])] = target.view(size, -1)
        logits = self._logits(base, input_ids.to(base.device), attention_mask.to(base.device))
        targets = targets.to(base.device)
        if (
            width == 1
        ):  # one target per position: the fused kernel, about a third faster than gather - logsumexp
            flat = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            logp = -flat.view(len(batch), length, 1)
        else:
            logp = logits.gather(-1, targets) - torch.logsumexp(logits, dim=-1, keepdim=True)
        return [
            logp[row, : d.tokens.size, 0]
            if d.targets.ndim == 1
            else logp[row, : d.tokens.size, : d.targets.shape[1]]
            for row, d in enumerate(batch)
        ]

    def forward_backward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str] | None,
        forward_only: bool = False,
    ) -> ForwardBackwardResult:
        """Loss and per-token logprobs of `data`; unless forward_only, adds the gradients to the adapter's
        (they accumulate across calls until optim_step). Every datum is checked before any gradient is touched."""
        adapter = self._adapter(model_id)
        base = adapter.base
        if not data:
            raise EngineError("forward_backward needs at least one datum")
        try:
            config = losses.resolve_config(loss_fn, loss_fn_config)
        except losses.LossError as error:
            raise EngineError(str(error)) from None
        checked = [_check_datum(i, datum, base.vocab_size, loss_fn) for i, datum in enumerate(data)]
        outputs: list[dict[str, np.ndarray]] = []
        total = 0.0
        with base.lock, torch.no_grad() if forward_only else nullcontext():
            base.peft.set_adapter(adapter.slot)
            for indices in _microbatches(checked):
                batch = [checked[i] for i in indices]
                loss = torch.zeros((), device=base.device)
                for datum, logp in zip(batch, self._target_logprobs(base, batch), strict=True):
                    inputs = {k: torch.from_numpy(v).to(base.device) for k, v in datum.inputs.items()}
                    datum_loss, elementwise = losses.compute(loss_fn, logp, inputs, config)
                    loss = loss + datum_loss
                    outputs.append(
                        {
                            "logprobs": logp.detach().float().cpu().numpy(),
                            "elementwise_loss": elementwise.detach().float().cpu().numpy(),
                        }
                    )
                if not forward_only:
                    loss.backward()
                total += float(loss.detach())
        metrics = {
            "loss:sum": total,
            "num_tokens:sum": float(sum(d.tokens.size for d in checked)),
            "num_sequences:sum": float(len(checked)),
        }
        return ForwardBackwardResult(outputs, metrics)

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
        """A PEFT-compatible adapter directory (safetensors + adapter_config.json) plus nightlab metadata and,
        optionally, the optimizer moments; written beside the target and renamed into place."""
        from safetensors.torch import save_file

        adapter = self._adapter(model_id)
        base = adapter.base
        with base.lock:
            weights = {key: p.detach().to("cpu", copy=True).contiguous() for key, p in adapter.params.items()}
            optimizer_state: dict[str, torch.Tensor] = {}
            if with_optimizer:
                for key, param in adapter.params.items():
                    for stat, value in adapter.optimizer.state.get(param, {}).items():
                        optimizer_state[f"{key}::{stat}"] = value.detach().to("cpu", copy=True)
            config = base.peft.peft_config[adapter.slot]
            meta = {
                "format": 1,
                "base_model": base.info.name,
                "lora": asdict(adapter.lora),
                "steps": adapter.steps,
                "with_optimizer": with_optimizer,
            }
        with models.atomic_dir(Path(directory)) as tmp:
            save_file(weights, str(tmp / ADAPTER_WEIGHTS))
            config.save_pretrained(str(tmp))
            if with_optimizer:
                torch.save(optimizer_state, tmp / OPTIMIZER_STATE)
            (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))

    def _read_checkpoint(self, directory: Path) -> dict[str, Any]:
        meta_path = Path(directory) / ADAPTER_META
        if not meta_path.is_file() or not (Path(directory) / ADAPTER_WEIGHTS).is_file():
            raise EngineError(f"{directory} is not a nightlab adapter checkpoint (no {ADAPTER_META})")
        return json.loads(meta_path.read_text())

    def _load_weights(self, base: _Base, slot: str, directory: Path) -> None:
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

    def load_adapter(self, model_id: str, base_model: str, directory: Path, with_optimizer: bool) -> None:
        """Create `model_id` (or overwrite its weights) from a checkpoint; optimizer moments too if asked."""
        meta = self._read_checkpoint(directory)
        base = self._base(base_model)
        if self._resolve(meta["base_model"]).name != base.info.name:
            raise EngineError(
                f"checkpoint {directory} was trained on {meta['base_model']}, not {base.info.name}"
            )
        if with_optimizer and not (Path(directory) / OPTIMIZER_STATE).is_file():
            raise EngineError(f"checkpoint {directory} has no optimizer state; load it without the optimizer")
        lora = LoraSpec(**meta["lora"])
        with self._lock:
            exists = model_id in self._adapters
        if exists:
            adapter = self._adapter(model_id)
            if adapter.base is not base or _shape(adapter.lora) != _shape(lora):
                raise EngineError(
                    f"checkpoint {directory} ({lora}) does not fit model_id {model_id!r} ({adapter.lora})"
                )
        else:
            self.create_adapter(model_id, base_model, lora)
            adapter = self._adapter(model_id)
        with base.lock:
            self._load_weights(base, adapter.slot, directory)
            adapter.optimizer.state.clear()
            adapter.optimizer.zero_grad(set_to_none=True)
            adapter.steps = int(meta.get("steps", 0))
            if with_optimizer:
                state = torch.load(
                    Path(directory) / OPTIMIZER_STATE, map_location=base.device, weights_only=True
                )
                for key, param in adapter.params.items():
                    stats = {k.split("::", 1)[1]: v for k, v in state.items() if k.split("::", 1)[0] == key}
                    if stats:
                        if "step" in stats:
                            stats["step"] = stats["step"].cpu()
                        adapter.optimizer.state[param] = stats

    # -- sampling --

    def _sampler_slot(self, base: _Base, directory: Path) -> str:
        """The PEFT name of a checkpoint loaded for sampling; loads it on first use, evicts the least recent."""
        from peft import LoraConfig

        directory = Path(directory).resolve()
        meta = self._read_checkpoint(directory)
        if self._resolve(meta["base_model"]).name != base.info.name:
            raise EngineError(
                f"checkpoint {directory} was trained on {meta['base_model']}, not {base.info.name}"
            )
        key = (str(directory), (directory / ADAPTER_WEIGHTS).stat().st_mtime_ns)
        if key in base.samplers:
            base.samplers.move_to_end(key)
            return base.samplers[key]
        slot = self._add_slot(base, LoraConfig.from_pretrained(str(directory)), seed=0)
        try:
            self._load_weights(base, slot, directory)
        except BaseException:
            self._remove_slot(base, slot)
            raise
        base.samplers[key] = slot
        while len(base.samplers) > SAMPLER_ADAPTERS_CACHED:
            _, evicted = base.samplers.popitem(last=False)
            self._remove_slot(base, evicted)
        return slot

    def forget_samplers(self, under: Path) -> None:
        """Unload the sampling adapters loaded from checkpoints inside `under` (weights about to be deleted)."""
        root = Path(under).resolve()
        with self._lock:
            bases = list(self._bases.values())
        for base in bases:
            with base.lock:
                for key in [k for k in base.samplers if Path(k[0]).is_relative_to(root)]:
                    self._remove_slot(base, base.samplers.pop(key))

    def check_sample(self, base_model: str, request: SampleRequest) -> None:
        """Refuse a sampling request the model can never serve (token ids outside its vocabulary, a prompt plus
        max_tokens beyond its context, bad parameters) before it joins a batch."""
        from nightlab.train import sampling

        base = self._base(base_model)
        try:
            sampling.validate(request, base.vocab_size, base.info.max_context_length or None)
        except sampling.SamplingInputError as error:
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
                    if base.peft is None:
                        return sampling.generate(base.model, base.tokenizer, requests)
                    with base.peft.disable_adapter():
                        return sampling.generate(base.peft, base.tokenizer, requests)
                slot = self._sampler_slot(base, adapter_dir)  # first, as it may wrap the base into base.peft
                base.peft.set_adapter(slot)
                return sampling.generate(base.peft, base.tokenizer, requests)
        except sampling.SamplingInputError as error:
            raise EngineError(str(error)) from None
