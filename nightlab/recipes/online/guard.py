"""Whether a new checkpoint may be served: the online loop's guard against regressions and reward hacking.

A candidate is promoted only if, on held-out prompts, it beats the checkpoint served now on the reward
model's score, does not fall on the fixed rubric (a verifier the reward model cannot move), stays within a
KL bound of the reference model, and the reward model still agrees with the people at least as well as when
the served checkpoint was promoted. A policy that learned to please a broken reward model raises its reward
and lowers the rubric, or drifts far from the reference, or comes with a reward model that stopped agreeing
with its users: each is refused, and the reason says which.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Evaluation:
    """A checkpoint on the held-out prompts: mean reward-model score, mean rubric score, mean token KL to the
    reference model (nats)."""

    reward: float
    rubric: float
    kl: float


@dataclass(frozen=True)
class Bounds:
    min_reward_gain: float = 0.0  # the candidate's reward must beat the served one's by more than this
    rubric_tolerance: float = 0.0  # and its rubric score may fall by at most this
    kl_max: float = 1.0  # nats per token to the reference model
    agreement_drop: float = 0.1  # how far the reward model's held-out agreement may fall


def promotion(
    candidate: Evaluation,
    served: Evaluation,
    agreement_now: float | None,
    agreement_then: float | None,
    bounds: Bounds,
) -> tuple[bool, str]:
    """(promote?, why), the first failed rule named with its numbers."""
    gain = candidate.reward - served.reward
    if gain <= bounds.min_reward_gain:
        return False, f"reward {candidate.reward:.3f} does not beat the served {served.reward:.3f}"
    if candidate.rubric < served.rubric - bounds.rubric_tolerance:
        return False, (
            f"rubric fell from {served.rubric:.3f} to {candidate.rubric:.3f} while reward rose by "
            f"{gain:.3f}: the reward model is being gamed"
        )
    if candidate.kl > bounds.kl_max:
        return False, f"KL to the reference {candidate.kl:.3f} nats/token is over the bound {bounds.kl_max:g}"
    if (
        agreement_now is not None
        and agreement_then is not None
        and agreement_now < agreement_then - bounds.agreement_drop
    ):
        return False, (
            f"the reward model's held-out agreement fell from {agreement_then:.2f} to {agreement_now:.2f}"
        )
    rewards = f"reward {served.reward:.3f} -> {candidate.reward:.3f}"
    return True, f"{rewards}, rubric {served.rubric:.3f} -> {candidate.rubric:.3f}, KL {candidate.kl:.3f}"
