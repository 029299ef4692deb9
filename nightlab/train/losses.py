"""The Tinker loss functions, as pure torch over one datum's target log-probabilities.

Every loss takes `logp` (the policy's log-probability of each target token, shape (T,), or (T, K) for soft
cross-entropy targets), the datum's other `loss_fn_inputs` as float tensors, and the loss config; it returns
(sum over tokens, per-token elementwise loss of shape (T,)). Notation: q = the sampler's `logprobs`,
A = `advantages`, r = exp(logp - q), sg = stop-gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from nightlab.train.errors import LossError

LossFn = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], tuple[Tensor, Tensor]]
# Per-token clip thresholds may also arrive as loss_fn_inputs; they override the config values.
_THRESHOLD_INPUTS = ("clip_low_threshold", "clip_high_threshold")


def _sum(elementwise: Tensor) -> tuple[Tensor, Tensor]:
    return elementwise.sum(), elementwise


def _thresholds(
    like: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, Tensor]:
    """(low, high) ratio bounds: per-token inputs when the datum has them, else the config's scalars."""
    low, high = (inputs.get(key, torch.tensor(config[key], dtype=like.dtype)) for key in _THRESHOLD_INPUTS)
    return low.to(like), high.to(like)


def cross_entropy(
    logp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, Tensor]:
    """-sum w * logp. Weights may be any float (negative ones push probability down); without weights every
    target counts once. With (T, K) targets and weights this is cross-entropy against a soft target."""
    weights = inputs.get("weights")
    elementwise = -(logp if weights is None else weights * logp)
    return _sum(elementwise.sum(-1) if elementwise.dim() == 2 else elementwise)


def importance_sampling(
    logp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, Tensor]:
    """-sum r * A: REINFORCE corrected for sampling from q instead of the current policy."""
    return _sum(-torch.exp(logp - inputs["logprobs"]) * inputs["advantages"])


def ppo(logp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> tuple[Tensor, Tensor]:
    """-sum min(r * A, clip(r, lo, hi) * A), token by token."""
    advantages = inputs["advantages"]
    ratio = torch.exp(logp - inputs["logprobs"])
    low, high = _thresholds(logp, inputs, config)
    clipped = torch.clamp(ratio, low, high)
    return _sum(-torch.minimum(ratio * advantages, clipped * advantages))


def cispo(logp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> tuple[Tensor, Tensor]:
    """-sum sg(clip(r, lo, hi)) * logp * A: the clipped ratio only weighs the gradient; no token loses it."""
    low, high = _thresholds(logp, inputs, config)
    weight = torch.clamp(torch.exp(logp - inputs["logprobs"]), low, high).detach()
    return _sum(-weight * logp * inputs["advantages"])


def dro(logp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> tuple[Tensor, Tensor]:
    """-sum [logp * A - beta/2 * (logp - q)^2]: policy gradient with a quadratic pull towards the sampler."""
    delta = logp - inputs["logprobs"]
    return _sum(-(logp * inputs["advantages"] - 0.5 * config["beta"] * delta * delta))


def gspo(logp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> tuple[Tensor, Tensor]:
    """GSPO-token, as the Tinker docs define it: the sequence ratio s = exp(mean over the masked tokens of
    (logp - q)) replaces each token's ratio in value, while each token keeps its own logp's gradient; then
    PPO's clipped objective. The mask is `sequence_ratio_mask` when given, else the tokens with a nonzero
    advantage (prompt tokens carry A = 0 and no sampler logprob)."""
    advantages = inputs["advantages"]
    mask = inputs.get("sequence_ratio_mask", advantages) != 0
    log_gap = (logp.detach() - inputs["logprobs"])[mask]
    sequence_log_ratio = log_gap.mean() if log_gap.numel() else logp.new_zeros(())
    ratio = torch.exp(sequence_log_ratio + logp - logp.detach())
    low, high = _thresholds(logp, inputs, config)
    clipped = torch.clamp(ratio, low, high)
    return _sum(-torch.minimum(ratio * advantages, clipped * advantages))


def stable_reinforce(
    logp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, Tensor]:
    """nightlab's StableReinforce (docs/service.md has the formula and why): on the tokens the sampler drew
    (m = `sampled_mask`), -sg(min(pi/mu, c)) * A * logp + kl_coeff * k3(pi/q), where mu is the probability the
    token was drawn with (`sampling_logprobs`, after temperature/top-k/top-p), q the sampler model's own
    (`logprobs`), c = `clip_high_threshold` and k3(r) = r - 1 - log r >= 0; other tokens contribute nothing.

    Over the API the service fills q, mu and m from what the sampler recorded (found through the datums'
    provenance); a datum given straight to the engine without them counts every token, with mu = q.
    """
    q = inputs["logprobs"]
    drawn = inputs.get("sampling_logprobs", q)
    sampled = inputs.get("sampled_mask", torch.ones_like(q))
    weight = torch.clamp(torch.exp(logp - drawn), max=config["clip_high_threshold"]).detach()
    delta = logp - q
    kl = torch.exp(delta) - 1.0 - delta
    return _sum(sampled * (-weight * inputs["advantages"] * logp + config["kl_coeff"] * kl))


@dataclass(frozen=True)
class LossSpec:
    """A loss with the inputs it requires, the inputs it may use, and its config keys with their defaults."""

    fn: LossFn
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    config: Mapping[str, float] | None = None


_RL = ("logprobs", "advantages")
_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, optional=("weights",)),
    "importance_sampling": LossSpec(importance_sampling, _RL),
    "ppo": LossSpec(ppo, _RL, _THRESHOLD_INPUTS, _CLIP),
    "cispo": LossSpec(cispo, _RL, _THRESHOLD_INPUTS, _CLIP),
    "dro": LossSpec(dro, _RL, config={"beta": 0.05}),
    "gspo": LossSpec(gspo, _RL, (*_THRESHOLD_INPUTS, "sequence_ratio_mask"), _CLIP),
    "stable_reinforce": LossSpec(
        stable_reinforce,
        _RL,
        ("sampling_logprobs", "sampled_mask"),
        {"clip_high_threshold": 2.0, "kl_coeff": 0.0},
    ),
}


def _spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise LossError(f"unknown loss_fn {name!r}; supported: {', '.join(LOSSES)}")
    return LOSSES[name]


def resolve_config(name: str, config: Mapping[str, float | str] | None) -> dict[str, float]:
    """The loss's config with defaults filled in; unknown keys and non-numbers are errors naming the key."""
    defaults = dict(_spec(name).config or {})
    for key, value in (config or {}).items():
        if key not in defaults:
            allowed = ", ".join(defaults) or "none"
            raise LossError(f"loss_fn {name!r} has no config key {key!r} (allowed: {allowed})")
        try:
            defaults[key] = float(value)
        except (TypeError, ValueError):
            raise LossError(f"loss_fn_config[{key!r}] must be a number, got {value!r}") from None
    return defaults


def check_inputs(name: str, target_shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise LossError unless the datum carries what loss `name` needs, each shaped like the targets."""
    spec = _spec(name)
    if len(target_shape) == 2 and name != "cross_entropy":
        raise LossError(f"loss_fn {name!r} takes target_tokens of shape (T,), got {target_shape}")
    for key in spec.required:
        if key not in shapes:
            raise LossError(f"loss_fn {name!r} needs loss_fn_inputs[{key!r}]")
    for key in (*spec.required, *spec.optional):
        if key in shapes and tuple(shapes[key]) != tuple(target_shape):
            raise LossError(
                f"loss_fn_inputs[{key!r}] has shape {tuple(shapes[key])}, "
                f"target_tokens has {tuple(target_shape)}"
            )


def compute(
    name: str, logp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, Tensor]:
    """(summed loss, elementwise loss) of loss `name`; inputs and config as checked by the functions above."""
    spec = _spec(name)
    used = {key: inputs[key] for key in (*spec.required, *spec.optional) if key in inputs}
    return spec.fn(logp, used, config)
