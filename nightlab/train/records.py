"""The records the engine takes and returns: plain dataclasses the API layer builds without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from nightlab.train.errors import UserError

Precision = Literal["auto", "fp32", "bf16"]
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


@dataclass
class LoraSpec:
    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    def __post_init__(self) -> None:
        low, high = SEED_RANGE
        if self.seed is not None and not low <= self.seed <= high:
            raise UserError(f"LoRA seed must be between {low} and {high}, got {self.seed}")


@dataclass
class AdamParams:
    """AdamW settings; refused when not finite or out of range, before they can turn an adapter into NaN."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not math.isfinite(value):
                raise UserError(f"Adam parameter {name} must be a finite number, got {value}")
        if self.learning_rate < 0 or self.eps < 0 or self.weight_decay < 0:
            raise UserError(
                f"Adam learning_rate, eps and weight_decay must be >= 0, got {self.learning_rate}, "
                f"{self.eps} and {self.weight_decay}"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"Adam {name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ImageInput:
    """An image in a model input, as sent (png or jpeg bytes; the engine decodes them, so that a bad image
    fails its own request in order); it goes before text token `at`."""

    data: bytes
    format: str
    at: int
    expected_tokens: int | None = None  # the client's count of its placeholder tokens, checked if given


@dataclass
class Datum:
    tokens: list[int]  # model input (all token chunks concatenated)
    loss_fn_inputs: dict[str, np.ndarray]  # target_tokens (T,) or (T, K), weights, logprobs, advantages, ...
    images: list[ImageInput] = field(default_factory=list)  # targets count each image's placeholder tokens


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
    image_token_id: int | None = None  # the placeholder a chat template writes for an image; None: text only
