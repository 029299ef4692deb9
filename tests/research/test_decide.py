"""The noise-aware keep rule."""

from __future__ import annotations

import math

import pytest

from nightlab.config import DecideSection
from nightlab.research.decide import bar, judge, judge_runs, noise_floor, probability_better, t_quantile

RULE = DecideSection(z=2.0, confirm=True, confirm_k=4.0, alpha=0.001, confirm_runs=5)


def test_noise_floor_is_the_sample_std_with_a_floor():
    assert math.isclose(noise_floor([1.0, 1.2, 1.4]), 0.2)
    assert noise_floor([5.0, 5.0]) == 5.0 * 1e-4  # deterministic metric: relative floor, never zero
    assert noise_floor([0.0]) > 0


def test_t_quantiles_match_the_tables():
    for p, dof, table in [
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 5, 2.571),
        (0.999, 10, 4.144),
        (0.999, 30, 3.385),
        (0.95, 4, 2.132),
    ]:
        assert t_quantile(p, dof) == pytest.approx(table, abs=1e-3)
    assert t_quantile(0.999, 0) == math.inf


def test_clear_gain_is_kept_in_the_goal_direction():
    j = judge([0.5], best=1.0, best_runs=2, noise=0.01, dof=10, goal="minimize", rule=RULE)
    assert j.verdict == "keep" and math.isclose(j.margin, 0.5) and math.isclose(j.sigmas, 50)
    assert j.reason.startswith("clear gain") and j.probability > 0.999
    assert judge([1.5], 1.0, 2, 0.01, 10, "maximize", RULE).verdict == "keep"
    assert judge([1.5], 1.0, 2, 0.01, 10, "minimize", RULE).verdict == "discard"


def test_a_noise_floor_from_few_runs_cannot_skip_the_re_run():
    # 50 noise, but one degree of freedom: t(0.999, 1) = 318, so the first run alone proves nothing
    j = judge([0.5], best=1.0, best_runs=2, noise=0.01, dof=1, goal="minimize", rule=RULE)
    assert j.verdict == "confirm" and "re-running" in j.reason


def test_gain_within_the_noise_is_discarded():
    j = judge([0.985], best=1.0, best_runs=2, noise=0.01, dof=10, goal="minimize", rule=RULE)
    assert j.verdict == "discard" and "within the noise" in j.reason
    assert j.margin <= bar(0.01, RULE)


def test_min_delta_raises_the_bar():
    rule = DecideSection(min_delta=0.1, z=2.0, confirm=False)
    assert judge([0.95], 1.0, 2, 0.001, 10, "minimize", rule).verdict == "discard"
    assert judge([0.85], 1.0, 2, 0.001, 10, "minimize", rule).verdict == "keep"


def test_re_runs_decide_by_a_t_test_and_stop_after_confirm_runs():
    assert judge([0.97], 1.0, 2, 0.01, 20, "minimize", RULE).verdict == "confirm"  # 3 noise, under confirm_k
    lucky_seed = judge([0.97, 1.0], 1.0, 2, 0.01, 20, "minimize", RULE)
    assert lucky_seed.verdict == "discard" and "within the noise" in lucky_seed.reason
    # one re-run 2.6 noise better: not yet beyond t(0.999, 20) = 3.55 standard errors, so another re-run
    assert judge([0.97, 0.974], 1.0, 2, 0.01, 20, "minimize", RULE).verdict == "confirm"
    real = judge([0.97, 0.95, 0.95], 1.0, 2, 0.01, 20, "minimize", RULE)
    assert real.verdict == "keep" and real.reason.startswith("confirmed by 2 re-run(s)")
    spent = judge([0.97] + [0.975] * 5, 1.0, 2, 0.01, 20, "minimize", RULE)
    assert spent.verdict == "discard" and spent.reason.startswith(
        "not confirmed after 5 re-run(s): the re-runs' mean margin +0.025"
    )
    worse = judge([0.9, 1.02], 1.0, 2, 0.01, 20, "minimize", RULE)
    assert worse.verdict == "discard" and worse.reason.startswith("not confirmed")


def test_without_confirmation_the_first_run_must_pass_the_test_alone():
    rule = DecideSection(confirm=False)
    assert judge([0.97], 1.0, 2, 0.01, 20, "minimize", rule).verdict == "discard"
    assert judge([0.9], 1.0, 2, 0.01, 20, "minimize", rule).verdict == "keep"


def test_judge_runs_pools_the_candidates_own_spread():
    repeats = [[1.0, 1.0002]]
    first, noise = judge_runs([0.99], repeats, 1.0001, 2, "minimize", RULE)
    assert noise == pytest.approx(noise_floor([1.0, 1.0002]))
    again, pooled = judge_runs([0.99, 1.01], repeats, 1.0001, 2, "minimize", RULE)
    assert pooled > 10 * noise and again.verdict == "discard"  # the re-run showed how noisy the metric is


def test_probability_grows_with_margin_and_runs():
    assert math.isclose(probability_better(0.0, 1.0, 1, 1), 0.5)
    assert probability_better(1.0, 1.0, 1, 1) < probability_better(1.0, 1.0, 2, 3) < 1.0
