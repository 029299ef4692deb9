"""Early abort: a training run whose progress is clearly hopeless is stopped before its budget is spent.

Half the discarded runs of a night were visibly lost a third of the way in. When `metric.progress` names a
number the training prints as it goes (`loss 3.21`, `loss: 3.21` or `loss=3.21` on a line), nightlab reads it
as a curve over the fraction of the budget spent, keeps the curve in the journal, and compares a candidate's
first run with the curves of every kept run (the baseline's and the kept candidates'). A run that reads worse
than all of them, at the same fraction, by more than `decide.abort_sigmas` times the spread of the
baseline's own repeats, `decide.abort_readings` times in a row after `decide.abort_after` of the budget, is
stopped and recorded as `aborted` with its curve.

Printed progress is the editable code's own word, so it is only ever used against the code: it can stop a
run, never help one be kept (that takes the harness's metric, as always).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nightlab.config import DecideSection
from nightlab.research.decide import Goal

Curve = list[list[float]]  # [fraction of the budget spent, value] readings in time order
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# Fractions at which the baseline's repeats are compared to estimate the curve's noise.
_NOISE_GRID = 20


def progress_pattern(name: str) -> re.Pattern[str]:
    """`name` as a word followed by a number: `loss 3.2`, `loss: 3.2`, `loss=3.2`, `| loss 3.2 |`."""
    return re.compile(rf"(?:^|[^\w.]){re.escape(name)}\s*[:=]?\s*({_NUMBER})(?![\w.])")


def value_at(curve: Curve, fraction: float) -> float | None:
    """The curve's value at `fraction`, linear between readings; None before its first reading. Past its
    last reading, the last value: a run that ended its budget early has nothing newer to say."""
    if not curve or fraction < curve[0][0]:
        return None
    for (f0, v0), (f1, v1) in zip(curve, curve[1:], strict=False):
        if f0 <= fraction <= f1:
            return v0 if f1 == f0 else v0 + (v1 - v0) * (fraction - f0) / (f1 - f0)
    return curve[-1][1]


def curve_noise(repeats: Sequence[Curve], start: float) -> float | None:
    """The spread of the same code's curves (the baseline's repeats) pooled over the fractions from `start` to
    the end of the budget; None with fewer than two curves to compare."""
    if len(repeats) < 2:
        return None
    variances = []
    for i in range(_NOISE_GRID + 1):
        fraction = start + (1 - start) * i / _NOISE_GRID
        values = [v for c in repeats if (v := value_at(c, fraction)) is not None]
        if len(values) >= 2:
            variances.append(statistics.variance(values))
    return math.sqrt(statistics.fmean(variances)) if variances else None


@dataclass(frozen=True)
class AbortRule:
    """When a candidate's progress is hopeless: worse than every kept curve by more than `sigmas` * `noise`
    at the same fraction, `readings` readings in a row, from `after` on."""

    kept: list[Curve]
    noise: float
    goal: Goal
    after: float
    sigmas: float
    readings: int

    def hopeless(self, fraction: float, value: float) -> tuple[float, float] | None:
        """(the best kept value at `fraction`, how far the reading is behind it) when it is past the
        line; else None."""
        if fraction < self.after:
            return None
        here = [v for c in self.kept if (v := value_at(c, fraction)) is not None]
        if len(here) < len(self.kept) or not here:
            return None  # some kept run has no reading this early: no comparison
        worst = max(here) if self.goal == "minimize" else min(here)
        behind = value - worst if self.goal == "minimize" else worst - value
        return (worst, behind) if behind > self.sigmas * self.noise else None


def abort_rule(
    kept: list[Curve], best: list[Curve], baseline: list[Curve], goal: Goal, decide: DecideSection
) -> AbortRule | None:
    """The rule for a candidate's first run, judged against the `kept` curves or the `best`'s as
    `decide.abort_against` says, or None where there is nothing to judge by: early abort off, no such
    curve, or fewer than two baseline curves to measure the noise with."""
    kept = kept if decide.abort_against == "kept" else best
    if not decide.early_abort or not kept:
        return None
    noise = curve_noise(baseline, decide.abort_after)
    if not noise:
        return None
    return AbortRule(kept, noise, goal, decide.abort_after, decide.abort_sigmas, decide.abort_readings)


@dataclass
class ProgressWatch:
    """Reads one training phase's progress lines (`feed`, from the log reader) into a curve and, with a
    rule, says when to stop (`stop_reason`, polled by the phase's supervisor)."""

    name: str
    budget_seconds: float
    rule: AbortRule | None = None
    clock: Callable[[], float] = time.monotonic
    curve: Curve = field(default_factory=list)
    stop_reason: str = ""
    _behind: int = field(default=0, init=False)  # readings in a row past the line
    _started: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._pattern = progress_pattern(self.name)
        self._started = self.clock()

    def feed(self, line: str) -> None:
        match = self._pattern.search(line)
        if match is None or self.stop_reason:
            return
        value = float(match.group(1))
        if not math.isfinite(value):
            return
        fraction = round((self.clock() - self._started) / self.budget_seconds, 4)
        self.curve.append([fraction, value])
        verdict = self.rule.hopeless(fraction, value) if self.rule else None
        self._behind = self._behind + 1 if verdict else 0
        if verdict and self.rule and self._behind >= self.rule.readings:
            worst, behind = verdict
            self.stop_reason = (
                f"aborted at {fraction:.0%} of the budget: {self.name} {value:.6g} was behind every kept "
                f"run's at that point (the worst {worst:.6g}) by {behind:.4g}, more than "
                f"decide.abort_sigmas {self.rule.sigmas:g} x the curve's noise {self.rule.noise:.4g}, "
                f"{self._behind} readings in a row"
            )
