"""The noise-aware keep rule: a candidate is kept only when it beats the best, re-measured beside it, by more
than the noise.

Greedy "lower is better" loops keep lucky seeds. Here the noise floor is the spread of repeated runs of the
same code (each with another seed offset): the baseline repeats, pooled with the re-runs of every candidate
and of the best re-measured beside them, so an estimate from a few baseline runs that came out too small
grows as the run goes on. The rule works on numbers alone; which journal records count as repeats is
`state.repeat_groups`, and `confirm.measure_candidate` runs what the rule asks for.

A candidate's first run must beat the best as last measured (its recorded mean, or its runs beside the
last candidate confirmed against it: `state.remeasured`) by more than max(min_delta, z * noise) to be
considered at all. A machine's speed drifts (other jobs come and go), so that level may be from another
period; what decides is measured now, in pairs: the best is run again, then the candidate, with the same
seed offset (best, candidate, best, candidate ...), up to `confirm_runs` pairs. The candidate is kept only
when the mean of the pairs' differences (re-runs, unlike the first run, were not picked for looking good)
beats the bar and passes a one-sided Student t test at level `alpha`: a margin over t(1 - alpha, dof)
standard errors of a difference, where dof are the degrees of freedom behind the pooled noise. The t
quantile makes the few baseline runs of a fresh run count for what they are worth (12.7 noise units at 1
degree of freedom and alpha 0.025, 1.96 at many). Drift slower than one pair cancels in the differences.

Too good to be true is not kept on its word. A first run more than `implausible_sigmas` noise units better
than the best is quarantined: no shortcut, at least `quarantine_runs` pairs, and every pair must reproduce a
gain beyond the bar, else the candidate is recorded as `quarantine`. A run past `best_possible`, a value the
metric cannot honestly reach, is quarantined at once and never kept.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Literal

from nightlab.config import DecideSection

Goal = Literal["minimize", "maximize"]
Verdict = Literal["keep", "discard", "confirm", "quarantine"]

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
    quarantine: str = ""  # why the result is too good to take on its word; "" when it is not


def probability_better(margin: float, noise: float, n_candidate: int, n_best: int) -> float:
    """P(true gain > 0) under Gaussian noise: the margin over the standard error of a difference of means."""
    se = noise * math.sqrt(1.0 / n_candidate + 1.0 / n_best)
    return 0.5 * (1.0 + math.erf(margin / (se * math.sqrt(2.0))))


def impossible(runs: list[float], goal: Goal, rule: DecideSection) -> str:
    """Why one of `runs` cannot be an honest result (it is past `best_possible`), or ""."""
    limit = rule.best_possible
    past = [v for v in runs if limit is not None and gain(v, limit, goal) > 0]
    if not past:
        return ""
    return (
        f"a run scored {past[0]:.6g}, past decide.best_possible {limit:g}, which the metric cannot honestly "
        "reach: look at the evaluation"
    )


def implausible(first: float, best: float, noise: float, goal: Goal, rule: DecideSection) -> str:
    """Why a first run is too good to take on its word (more than `implausible_sigmas` noise units better
    than the best in one step, `noise` the floor before the candidate's own runs), or ""."""
    sigmas = gain(first, best, goal) / noise
    if sigmas <= rule.implausible_sigmas:
        return ""
    limit = f"decide.implausible_sigmas {rule.implausible_sigmas:g}"
    return f"the first run is {sigmas:.0f} noise better than the best ({limit})"


def judge(
    candidate: list[float],
    best_now: list[float],
    best: float,
    best_runs: int,
    noise: float,
    dof: int,
    goal: Goal,
    rule: DecideSection,
    held: str = "",
) -> Judgement:
    """Decide on a candidate from its runs so far: keep, discard, quarantine, or ask for another run (see the
    module docstring).

    `candidate` holds the first run, then the re-runs; `best_now` the best re-measured, one run before each
    re-run; `best` is the best as last measured, the mean of `best_runs` runs. `noise` and `dof` are the
    pooled noise floor they are judged against; `held` says why the first run is implausible, if it is.
    """
    if beyond := impossible(candidate, goal, rule):
        margin = gain(candidate[0], best, goal)
        return Judgement(
            "quarantine", margin, margin / noise, 0.5, f"quarantined, never kept: {beyond}", quarantine=beyond
        )
    if len(candidate) == 1:
        return _first_run(candidate[0], best, best_runs, noise, dof, goal, rule, held)
    return _paired(candidate[1:], best_now, noise, dof, goal, rule, held)


def _first_run(
    first: float,
    best: float,
    best_runs: int,
    noise: float,
    dof: int,
    goal: Goal,
    rule: DecideSection,
    held: str,
) -> Judgement:
    """The first run against the best's recorded mean: the bar to be considered at all."""
    margin = gain(first, best, goal)
    sigmas, prob, need = margin / noise, probability_better(margin, noise, 1, best_runs), bar(noise, rule)
    shown = f"margin {margin:+.6g} = {sigmas:+.2f} noise; bar {need:.6g}"
    if margin <= need:
        return Judgement("discard", margin, sigmas, prob, f"within the noise or worse ({shown})")
    if rule.confirm:
        return Judgement(
            "confirm",
            margin,
            sigmas,
            prob,
            f"re-running it beside the best ({shown})",
            quarantine=held,
        )
    if held:
        why = f"quarantined: {held}, and decide.confirm is off, so it cannot be re-verified ({shown})"
        return Judgement("quarantine", margin, sigmas, prob, why, quarantine=held)
    critical = critical_margin(noise, dof, 1, best_runs, rule.alpha)
    test = _t_test(rule, dof, critical)
    if margin > critical:
        return Judgement("keep", margin, sigmas, prob, f"clear gain ({shown}; {test})")
    return Judgement("discard", margin, sigmas, prob, f"not significant without a re-run ({shown}; {test})")


def _paired(
    reruns: list[float],
    best_now: list[float],
    noise: float,
    dof: int,
    goal: Goal,
    rule: DecideSection,
    held: str,
) -> Judgement:
    """The re-runs against the best re-measured beside them, pair by pair."""
    diffs = [gain(c, b, goal) for c, b in zip(reruns, best_now, strict=False)]
    n, margin = len(diffs), statistics.fmean(diffs)
    sigmas, prob, need = margin / noise, probability_better(margin, noise, n, n), bar(noise, rule)
    critical = critical_margin(noise, dof, n, n, rule.alpha)
    said = (
        f"the re-runs' mean margin {margin:+.6g} over the best re-measured beside them ({sigmas:+.2f} "
        f"noise); bar {need:.6g}; {_t_test(rule, dof, critical)}"
    )

    def verdict(decision: Verdict, reason: str) -> Judgement:
        return Judgement(decision, margin, sigmas, prob, reason, quarantine=held)

    if held and (short := next((i for i, d in enumerate(diffs, 1) if d <= need), None)):
        return verdict(
            "quarantine",
            f"quarantined: {held}, but re-run {short} gained {diffs[short - 1]:+.6g} over the best beside "
            f"it, not beyond the bar ({said})",
        )
    if held and n < rule.quarantine_runs:
        return verdict(
            "confirm", f"verifying an implausible gain, re-run {n} of {rule.quarantine_runs} ({said})"
        )
    if margin > max(need, critical):
        checked = ", each beyond the bar, as an implausible gain must be" if held else ""
        return verdict("keep", f"confirmed by {n} re-run(s){checked} ({said})")
    if n < rule.confirm_runs and margin > 0:
        return verdict("confirm", f"re-running again ({said})")
    if held:
        return verdict("quarantine", f"quarantined: {held}; not confirmed after {n} re-run(s) ({said})")
    return verdict("discard", f"not confirmed after {n} re-run(s): {said}")


def _t_test(rule: DecideSection, dof: int, critical: float) -> str:
    return f"t test at alpha {rule.alpha:g} with {dof} degrees of freedom needs {critical:.6g}"


def judge_runs(
    candidate: list[float],
    best_now: list[float],
    repeats: list[list[float]],
    best: float,
    best_runs: int,
    goal: Goal,
    rule: DecideSection,
) -> tuple[Judgement, float]:
    """`judge` with the noise pooled from `repeats` and the re-runs so far (the candidate's, not its first
    run, which was picked for looking good, and the best's), and the first run's plausibility judged against
    `repeats` alone; and that noise."""
    held = implausible(candidate[0], best, pooled_noise_floor(repeats), goal, rule)
    groups = [*repeats, *(g for g in (candidate[1:], best_now) if len(g) >= 2)]
    noise = pooled_noise_floor(groups)
    verdict = judge(candidate, best_now, best, best_runs, noise, pooled_dof(groups), goal, rule, held)
    return verdict, noise
