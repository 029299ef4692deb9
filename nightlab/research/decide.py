"""The noise-aware keep rule: a candidate is kept only when it beats the best by more than the noise.

Greedy "lower is better" loops keep lucky seeds. Here the noise floor is the spread of repeated baseline
runs (each with another seed offset), a keep must clear max(min_delta, z * noise), and small margins are
re-run once with another seed before they count.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Literal

from nightlab.config import DecideSection

Goal = Literal["minimize", "maximize"]
Verdict = Literal["keep", "discard", "confirm"]

# Relative floor: a perfectly deterministic metric still gets a noise floor of 1e-4 of its magnitude, so
# float-level wiggles (or a seed that changes nothing measurable) never count as a gain.
RELATIVE_NOISE_FLOOR = 1e-4
ABSOLUTE_NOISE_FLOOR = 1e-12


def noise_floor(values: list[float]) -> float:
    """Sample standard deviation of repeated runs of the same code, never below a small floor."""
    if not values:
        raise ValueError("noise_floor needs at least one value")
    spread = statistics.stdev(values) if len(values) >= 2 else 0.0
    scale = abs(statistics.fmean(values))
    return max(spread, RELATIVE_NOISE_FLOOR * scale, ABSOLUTE_NOISE_FLOOR)


def gain(candidate: float, best: float, goal: Goal) -> float:
    """How much better the candidate is than the best, positive when better, in the metric's units."""
    return best - candidate if goal == "minimize" else candidate - best


def bar(noise: float, rule: DecideSection) -> float:
    """The margin a candidate must exceed to be kept."""
    return max(rule.min_delta, rule.z * noise)


@dataclass(frozen=True)
class Judgement:
    """A decision with the numbers behind it, as recorded in the journal."""

    verdict: Verdict
    margin: float
    sigmas: float
    probability: float
    reason: str


def probability_better(margin: float, noise: float, n_candidate: int, n_best: int) -> float:
    """P(true gain > 0) under Gaussian noise: the margin over the standard error of a difference of means."""
    se = noise * math.sqrt(1.0 / n_candidate + 1.0 / n_best)
    return 0.5 * (1.0 + math.erf(margin / (se * math.sqrt(2.0))))


def judge(
    runs: list[float], best: float, best_runs: int, noise: float, goal: Goal, rule: DecideSection
) -> Judgement:
    """Decide on a candidate from its run(s): keep, discard, or ask for one confirmation run.

    `runs` holds one value (first look) or two (after confirmation); the decision uses their mean.
    """
    value = statistics.fmean(runs)
    margin = gain(value, best, goal)
    sigmas = margin / noise
    prob = probability_better(margin, noise, len(runs), best_runs)
    need = bar(noise, rule)
    shown = f"margin {margin:+.6g} = {sigmas:+.2f} noise; bar {need:.6g}"
    if margin <= need:
        return Judgement("discard", margin, sigmas, prob, f"within the noise or worse ({shown})")
    if rule.confirm and len(runs) == 1 and margin < rule.confirm_k * noise:
        return Judgement("confirm", margin, sigmas, prob, f"small margin, re-running ({shown})")
    how = "confirmed by a re-run" if len(runs) > 1 else "clear gain"
    return Judgement("keep", margin, sigmas, prob, f"{how} ({shown})")
