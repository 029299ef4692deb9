"""The noise-aware keep rule: a candidate is kept only when it beats the best by more than the noise.

Greedy "lower is better" loops keep lucky seeds. Here the noise floor is the spread of repeated runs of the
same code (each with another seed offset): the baseline repeats, pooled with every candidate that was re-run,
so an estimate from a few baseline runs that came out too small grows as the run goes on. The rule works on
numbers alone; which journal records count as repeats is `state.repeat_groups`.

A candidate's first run must beat the best by more than max(min_delta, z * noise) to be considered at all.
It is then re-run with other seeds (up to `confirm_runs` times), and kept only when the mean of the re-runs,
which unlike the first run were not picked for looking good, passes a one-sided Student t test at level
`alpha` against the best: a margin over t(1 - alpha, dof) standard errors of the difference, where dof are
the degrees of freedom behind the pooled noise. The t quantile makes the few baseline runs of a fresh run
count for what they are worth (12.7 noise units at 1 degree of freedom and alpha 0.025, 1.96 at many), and
each re-run adds a degree of freedom to the pool. A first run far beyond the noise (confirm_k) that already
passes the test on its own is kept without re-runs.
"""

from __future__ import annotations

import functools
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
    dof = pooled_dof(groups)
    spread = math.sqrt(squares / dof) if dof else 0.0
    scale = abs(statistics.fmean(values))
    return max(spread, RELATIVE_NOISE_FLOOR * scale, ABSOLUTE_NOISE_FLOOR)


def pooled_dof(groups: list[list[float]]) -> int:
    """Degrees of freedom behind `pooled_noise_floor(groups)`."""
    return sum(len(g) - 1 for g in groups if len(g) >= 2)


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with a whole number of degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(dof))
    cos2 = math.cos(theta) ** 2
    term = total = 1.0
    if dof % 2:
        for k in range(1, (dof - 1) // 2):
            term *= 2 * k / (2 * k + 1) * cos2
            total += term
        inside = theta + (math.sin(theta) * math.cos(theta) * total if dof > 1 else 0.0)
        return 0.5 + inside / math.pi
    for k in range(1, dof // 2):
        term *= (2 * k - 1) / (2 * k) * cos2
        total += term
    return 0.5 + math.sin(theta) * total / 2


@functools.cache
def t_quantile(p: float, dof: int) -> float:
    """The t with P(T <= t) = p (0.5 <= p < 1), by bisection on `t_cdf`."""
    if dof < 1:
        return math.inf
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        low, high = high, high * 2.0
    for _ in range(100):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_cdf(mid, dof) < p else (low, mid)
    return high


def gain(candidate: float, best: float, goal: Goal) -> float:
    """How much better the candidate is than the best, positive when better, in the metric's units."""
    return best - candidate if goal == "minimize" else candidate - best


def bar(noise: float, rule: DecideSection) -> float:
    """The margin a candidate's first run and its mean must exceed to be considered at all."""
    return max(rule.min_delta, rule.z * noise)


def critical_margin(noise: float, dof: int, runs: int, best_runs: int, alpha: float) -> float:
    """The margin a mean of `runs` unselected runs must exceed to beat the best at level alpha (one-sided
    t)."""
    return t_quantile(1.0 - alpha, dof) * noise * math.sqrt(1.0 / runs + 1.0 / best_runs)


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
    runs: list[float], best: float, best_runs: int, noise: float, dof: int, goal: Goal, rule: DecideSection
) -> Judgement:
    """Decide on a candidate from its runs so far: keep, discard, or ask for another run (see the module
    docstring).

    `runs` holds the first run, then the re-runs; `noise` and `dof` are the pooled noise floor they are judged
    against, with the candidate's own spread in it once it has been re-run.
    """
    value = statistics.fmean(runs)
    margin = gain(value, best, goal)
    sigmas = margin / noise
    prob = probability_better(margin, noise, len(runs), best_runs)
    need = bar(noise, rule)
    shown = f"margin {margin:+.6g} = {sigmas:+.2f} noise; bar {need:.6g}"
    if margin <= need:
        return Judgement("discard", margin, sigmas, prob, f"within the noise or worse ({shown})")
    tested = runs[1:] or runs
    tested_margin = gain(statistics.fmean(tested), best, goal)
    critical = critical_margin(noise, dof, len(tested), best_runs, rule.alpha)
    test = f"t test at alpha {rule.alpha:g} with {dof} degrees of freedom needs {critical:.6g}"
    if len(runs) == 1:
        clear = tested_margin > critical and (margin >= rule.confirm_k * noise or not rule.confirm)
        if clear:
            return Judgement("keep", margin, sigmas, prob, f"clear gain ({shown}; {test})")
        if rule.confirm:
            return Judgement("confirm", margin, sigmas, prob, f"re-running with another seed ({shown})")
        return Judgement(
            "discard", margin, sigmas, prob, f"not significant without a re-run ({shown}; {test})"
        )
    said = f"the re-runs' mean margin {tested_margin:+.6g}; {test}"
    if tested_margin > critical:
        return Judgement("keep", margin, sigmas, prob, f"confirmed by {len(tested)} re-run(s) ({said})")
    if len(tested) < rule.confirm_runs and tested_margin > 0:
        return Judgement("confirm", margin, sigmas, prob, f"re-running again ({said})")
    return Judgement(
        "discard", margin, sigmas, prob, f"not confirmed after {len(tested)} re-run(s): {said} ({shown})"
    )


def judge_runs(
    runs: list[float],
    repeats: list[list[float]],
    best: float,
    best_runs: int,
    goal: Goal,
    rule: DecideSection,
) -> tuple[Judgement, float]:
    """`judge` with the noise pooled from `repeats` and, once re-run, the candidate's own runs; and that
    noise."""
    groups = [*repeats, runs] if len(runs) >= 2 else repeats
    noise = pooled_noise_floor(groups)
    return judge(runs, best, best_runs, noise, pooled_dof(groups), goal, rule), noise
