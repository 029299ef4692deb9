"""The keep rule under simulated Gaussian noise: how often a run of changes that do nothing keeps one.

The loop's decision code (pooled noise, pairs of the best and the candidate re-run until the t test
decides) is driven here exactly as `confirm.measure_candidate` drives it, over thousands of simulated runs;
docs/integrity.md quotes these rates (measured with 20000 runs).
"""

from __future__ import annotations

import math
import random
import statistics

import pytest

from nightlab.config import DecideSection
from nightlab.research import decide


def simulate(rule: DecideSection, gains: list[float], runs: int, seed: int = 5, drift: float = 0.0) -> float:
    """Fraction of simulated runs (baseline_runs repeats, then one candidate per gain) that kept a change.

    Each candidate's true value is -gain (the baseline's is 0); the best is re-measured at its true value,
    and its runs beside the last candidate confirmed against it are what the next first run must beat
    (`state.remeasured`). `drift` moves every run after the baselines (a machine that got faster:
    negative)."""
    rng = random.Random(seed)
    kept_any = 0
    for _ in range(runs):
        repeats = [[rng.gauss(0.0, 1.0) for _ in range(rule.baseline_runs)]]
        best, best_runs, true_best = statistics.fmean(repeats[0]), rule.baseline_runs, 0.0
        kept = False
        for g in gains:
            values, best_now = [rng.gauss(drift - g, 1.0)], []
            judgement, _ = decide.judge_runs(values, best_now, repeats, best, best_runs, "minimize", rule)
            while judgement.verdict == "confirm":
                best_now.append(rng.gauss(drift + true_best, 1.0))
                values.append(rng.gauss(drift - g, 1.0))
                judgement, _ = decide.judge_runs(values, best_now, repeats, best, best_runs, "minimize", rule)
            repeats = [*repeats, *(group for group in (values[1:], best_now) if len(group) >= 2)]
            if judgement.verdict == "keep":
                kept = True
                best, best_runs, true_best = statistics.fmean(values), len(values), -g
            elif best_now:
                best, best_runs = statistics.fmean(best_now), len(best_now)
        kept_any += kept
    return kept_any / runs


@pytest.mark.parametrize(
    ("settings", "most"),
    [({}, 0.02), ({"baseline_runs": 3}, 0.02), ({"baseline_runs": 5}, 0.02), ({"alpha": 0.002}, 0.035)],
)
def test_twenty_null_changes_are_rarely_kept(settings, most):
    assert simulate(DecideSection(**settings), [0.0] * 20, 2000) <= most


def test_the_t_test_lowers_the_false_keep_rate():
    """The bare rule (a first run and one re-run each beyond z * noise, the noise taken at face value) keeps a
    null change in about a third of runs of twenty with two baseline runs."""
    rng = random.Random(5)
    bare = 0
    for _ in range(2000):
        base = [rng.gauss(0.0, 1.0) for _ in range(2)]
        noise, best = statistics.stdev(base), statistics.fmean(base)
        bare += any(
            best - rng.gauss(0.0, 1.0) > 2 * noise and best - rng.gauss(0.0, 1.0) > 2 * noise
            for _ in range(20)
        )
    assert bare / 2000 > 0.15 > 0.02 > simulate(DecideSection(), [0.0] * 20, 2000)


def test_real_gains_are_still_kept():
    assert simulate(DecideSection(), [6.0], 2000) > 0.85
    assert simulate(DecideSection(baseline_runs=5), [6.0], 2000) > 0.99
    assert simulate(DecideSection(baseline_runs=5), [4.0], 2000) > 0.85


def test_a_machine_that_got_faster_keeps_no_change_that_does_nothing():
    """After the baselines everything runs 10 noise units faster: every null change looks like a large gain
    over the baselines' mean, and none is kept, as the best re-measured beside it is as fast."""
    assert simulate(DecideSection(), [0.0] * 20, 1000, drift=-10.0) <= 0.02
    assert simulate(DecideSection(), [6.0], 1000, drift=-10.0) > 0.85  # a real gain still shows


def test_pooled_noise_and_its_degrees_of_freedom():
    groups = [[1.0, 1.2, 1.4], [2.0, 2.4], [5.0]]
    # squares around each mean: 0.08 and 0.08; dof 2 + 1
    assert decide.pooled_noise_floor(groups) == pytest.approx(math.sqrt(0.16 / 3))
    assert decide.pooled_dof(groups) == 3
    assert decide.pooled_noise_floor([[1.0, 1.2, 1.4]]) == pytest.approx(decide.noise_floor([1.0, 1.2, 1.4]))


def test_a_lucky_first_run_is_not_carried_by_the_mean():
    # first run 6 noise better, re-run only 1 noise better: the mean (3.5) clears the bar, the re-runs do not
    j = decide.judge(
        [0.94, 0.99],
        [1.0],
        best=1.0,
        best_runs=3,
        noise=0.01,
        dof=30,
        goal="minimize",
        rule=DecideSection(confirm_runs=1),
    )
    assert j.verdict == "discard" and j.reason.startswith(
        "not confirmed after 1 re-run(s): the re-runs' mean margin +0.01"
    )
