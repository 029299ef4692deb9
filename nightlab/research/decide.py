"""The noise-aware keep rule: a candidate is kept only when it beats the best by more than the noise.

Greedy "lower is better" loops keep lucky seeds. Here the noise floor is the spread of repeated runs of the
same code (each with another seed offset): the baseline repeats, pooled with every candidate that was re-run,
so an estimate from a few baseline runs that came out too small grows as the run goes on. A keep must clear
max(min_delta, z * noise), and a small margin is re-run once with another seed; that re-run must clear the bar
on its own, since the first run was picked for looking good. Whether a margin is small enough to need the
re-run is judged against a cautious noise (the upper end of what the few runs behind the estimate allow), so a
noise floor that came out far too small cannot wave a lucky run through unconfirmed.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nightlab.config import DecideSection

Goal = Literal["minimize", "maximize"]
Verdict = Literal["keep", "discard", "confirm"]

# Relative floor: a perfectly deterministic metric still gets a noise floor of 1e-4 of its magnitude, so
# float-level wiggles (or a seed that changes nothing measurable) never count as a gain.
RELATIVE_NOISE_FLOOR = 1e-4
ABSOLUTE_NOISE_FLOOR = 1e-12
# How sure the cautious noise is to lie above the true one (one-sided), from a chi-square bound on the spread.
CAUTION = 0.95


def noise_floor(values: list[float]) -> float:
    """Sample standard deviation of repeated runs of the same code, never below a small floor."""
    return pooled_noise_floor([values])


def pooled_noise_floor(groups: list[list[float]]) -> float:
    """Pooled standard deviation of several groups, each the repeated runs of one piece of code.

    Each group contributes its spread around its own mean (len - 1 degrees of freedom), so groups of different
    code can be combined; groups of one value only set the scale of the relative floor.
    """
    values = [v for g in groups for v in g]
    if not values:
        raise ValueError("noise_floor needs at least one value")
    squares = sum(sum((v - statistics.fmean(g)) ** 2 for v in g) for g in groups if len(g) >= 2)
    dof = sum(len(g) - 1 for g in groups if len(g) >= 2)
    spread = math.sqrt(squares / dof) if dof else 0.0
    scale = abs(statistics.fmean(values))
    return max(spread, RELATIVE_NOISE_FLOOR * scale, ABSOLUTE_NOISE_FLOOR)


def pooled_dof(groups: list[list[float]]) -> int:
    """Degrees of freedom behind `pooled_noise_floor(groups)`."""
    return sum(len(g) - 1 for g in groups if len(g) >= 2)


def _chi2_cdf(x: float, dof: int) -> float:
    """P(chi-square with `dof` degrees of freedom <= x), by the series of the lower incomplete gamma function."""
    a, half = dof / 2.0, x / 2.0
    if half <= 0:
        return 0.0
    term = total = 1.0 / a
    n = 0
    while term > total * 1e-15 and n < 10_000:
        n += 1
        term *= half / (a + n)
        total += term
    return min(1.0, total * math.exp(a * math.log(half) - half - math.lgamma(a)))


def caution_factor(dof: int, confidence: float = CAUTION) -> float:
    """sqrt(dof / chi2 quantile): how far the true spread may exceed one estimated with `dof` degrees of freedom.

    With two baseline runs (1 dof) the sample spread is below a third of the true one 1 time in 4; this factor
    (about 16 for 1 dof, 4.4 for 2, 2.4 for 4, 1.6 for 10) covers that at the given confidence.
    """
    if dof <= 0:
        return math.inf
    low, high = 0.0, float(dof)
    while _chi2_cdf(high, dof) > 1 - confidence:
        high /= 2.0
    while _chi2_cdf(high, dof) < 1 - confidence:
        low, high = high, high * 2.0
    for _ in range(100):
        mid = (low + high) / 2.0
        low, high = (mid, high) if _chi2_cdf(mid, dof) < 1 - confidence else (low, mid)
    return math.sqrt(dof / high)


def repeat_groups(rows: Iterable[Mapping[str, Any]]) -> list[list[float]]:
    """From journal experiment rows: the measured baseline runs, then every candidate measured more than once."""
    base = [r["metric"] for r in rows if r["kind"] == "baseline" and r["decision"] == "keep"]
    repeats = [
        runs for r in rows
        if r["kind"] == "candidate" and len(runs := json.loads(r["metric_runs_json"] or "[]")) >= 2
    ]
    return ([base] if base else []) + repeats


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
    runs: list[float], best: float, best_runs: int, noise: float, goal: Goal, rule: DecideSection,
    noise_dof: int | None = None,
) -> Judgement:
    """Decide on a candidate from its run(s): keep, discard, or ask for one confirmation run.

    `noise_dof`, the degrees of freedom behind `noise`, makes the no-re-run shortcut cautious (see the module
    docstring); None trusts `noise` as exact.

    `runs` holds one value (first look) or more (after confirmation). The decision uses their mean, and each
    re-run must also clear the bar by itself: the first run was re-run because it looked good, so it is
    biased towards luck, while the re-run is a fresh, unselected measurement.
    """
    value = statistics.fmean(runs)
    margin = gain(value, best, goal)
    sigmas = margin / noise
    prob = probability_better(margin, noise, len(runs), best_runs)
    need = bar(noise, rule)
    shown = f"margin {margin:+.6g} = {sigmas:+.2f} noise; bar {need:.6g}"
    if margin <= need:
        return Judgement("discard", margin, sigmas, prob, f"within the noise or worse ({shown})")
    rerun = min((gain(v, best, goal) for v in runs[1:]), default=math.inf)
    if rerun <= need:
        return Judgement(
            "discard", margin, sigmas, prob,
            f"not confirmed: the re-run's margin {rerun:+.6g} = {rerun / noise:+.2f} noise is within the bar ({shown})",
        )
    cautious = noise * (caution_factor(noise_dof) if noise_dof is not None else 1.0)
    if rule.confirm and len(runs) == 1 and margin < rule.confirm_k * cautious:
        small = "small margin" if margin < rule.confirm_k * noise else "margin not yet clear of a noise floor from few runs"
        return Judgement("confirm", margin, sigmas, prob, f"{small}, re-running ({shown})")
    how = "confirmed by a re-run" if len(runs) > 1 else "clear gain"
    return Judgement("keep", margin, sigmas, prob, f"{how} ({shown})")
