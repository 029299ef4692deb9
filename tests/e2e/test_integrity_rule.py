"""The keep rule under simulated Gaussian noise: how often a run of changes that do nothing keeps one.

The loop's decision code (pooled noise, cautious shortcut, independent re-run) is driven here exactly as the
loop drives it, over thousands of simulated runs; docs/integrity.md quotes these rates.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest

from nightlab.config import DecideSection
from nightlab.research import decide


def simulate(rule: DecideSection, gains: list[float], runs: int, seed: int = 5) -> float:
    """Fraction of simulated runs (baseline_runs repeats, then one candidate per gain) that kept a change."""
    rng = random.Random(seed)
    kept_any = 0
    for _ in range(runs):
        repeats = [[rng.gauss(0.0, 1.0) for _ in range(rule.baseline_runs)]]
        best, best_runs = statistics.fmean(repeats[0]), rule.baseline_runs
        kept = False
        for g in gains:
            values = [rng.gauss(-g, 1.0)]
            groups = repeats
            j = decide.judge(values, best, best_runs, decide.pooled_noise_floor(groups), "minimize", rule,
                             noise_dof=decide.pooled_dof(groups))
            if j.verdict == "confirm":
                values.append(rng.gauss(-g, 1.0))
                repeats = groups = [*repeats, values]
                j = decide.judge(values, best, best_runs, decide.pooled_noise_floor(groups), "minimize", rule,
                                 noise_dof=decide.pooled_dof(groups))
            if j.verdict == "keep":
                kept = True
                best, best_runs = statistics.fmean(values), len(values)
        kept_any += kept
    return kept_any / runs


@pytest.mark.parametrize(
    ("baseline_runs", "z", "most"),
    [(2, 2.0, 0.20), (3, 2.0, 0.17), (5, 2.0, 0.10), (5, 3.0, 0.045), (8, 3.0, 0.015)],
)
def test_ten_null_changes_are_rarely_kept(baseline_runs, z, most):
    rule = DecideSection(baseline_runs=baseline_runs, z=z)
    assert simulate(rule, [0.0] * 10, 1000) <= most


def test_the_guards_lower_the_false_keep_rate():
    """Without pooling, caution and the independent re-run (the bare rule) three baseline runs keep far more."""
    rule = DecideSection(baseline_runs=3)
    rng = random.Random(5)
    bare = 0
    for _ in range(1000):
        base = [rng.gauss(0.0, 1.0) for _ in range(3)]
        noise, best = statistics.stdev(base), statistics.fmean(base)
        for _ in range(10):
            first = best - rng.gauss(0.0, 1.0)
            if first > 2 * noise and (first >= 4 * noise or (first + best - rng.gauss(0.0, 1.0)) / 2 > 2 * noise):
                bare += 1
                break
    assert bare / 1000 > 0.18 > simulate(rule, [0.0] * 10, 1000)


def test_real_gains_are_still_kept():
    assert simulate(DecideSection(baseline_runs=5, z=2.0), [6.0], 1000) > 0.95
    assert simulate(DecideSection(baseline_runs=5, z=3.0), [6.0], 1000) > 0.9


def test_pooled_noise_and_its_degrees_of_freedom():
    groups = [[1.0, 1.2, 1.4], [2.0, 2.4], [5.0]]
    # squares around each mean: 0.08 and 0.08; dof 2 + 1
    assert decide.pooled_noise_floor(groups) == pytest.approx(math.sqrt(0.16 / 3))
    assert decide.pooled_dof(groups) == 3
    assert decide.pooled_noise_floor([[1.0, 1.2, 1.4]]) == pytest.approx(decide.noise_floor([1.0, 1.2, 1.4]))


def test_caution_factor_matches_chi_square_quantiles():
    # sqrt(dof / chi2_0.05(dof)) from tables: chi2_0.05(1) = 0.00393, (2) = 0.1026, (10) = 3.940
    assert decide.caution_factor(1) == pytest.approx(math.sqrt(1 / 0.003932), rel=1e-3)
    assert decide.caution_factor(2) == pytest.approx(math.sqrt(2 / 0.102587), rel=1e-3)
    assert decide.caution_factor(10) == pytest.approx(math.sqrt(10 / 3.94030), rel=1e-3)
    assert decide.caution_factor(0) == math.inf


def test_a_lucky_first_run_is_not_carried_by_the_mean():
    rule = DecideSection(z=2.0)
    # first run 6 noise better, re-run only 1 noise better: the mean (3.5) clears the bar, the re-run does not
    j = decide.judge([0.94, 0.99], best=1.0, best_runs=3, noise=0.01, goal="minimize", rule=rule)
    assert j.verdict == "discard" and j.reason.startswith("not confirmed: the re-run's margin +0.01")


def test_a_noise_floor_from_few_runs_cannot_skip_the_re_run():
    rule = DecideSection(z=2.0, confirm_k=4.0)
    # 6 noise: beyond confirm_k * noise, but not beyond confirm_k * the cautious noise of 2 dof (4.4x)
    assert decide.judge([0.94], 1.0, 3, 0.01, "minimize", rule).verdict == "keep"
    j = decide.judge([0.94], 1.0, 3, 0.01, "minimize", rule, noise_dof=2)
    assert j.verdict == "confirm" and "noise floor from few runs" in j.reason
    assert decide.judge([0.5], 1.0, 3, 0.01, "minimize", rule, noise_dof=2).verdict == "keep"
