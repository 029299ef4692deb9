"""The records the engine takes and returns: plain dataclasses the API layer builds without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

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
