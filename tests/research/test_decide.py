"""The noise-aware keep rule."""

from __future__ import annotations

import math

import pytest

from nightlab.config import DecideSection
from nightlab.research.decide import (
    bar,
    implausible,
    judge,
    judge_runs,
    noise_floor,
    pooled_noise_floor,
    probability_better,
    t_quantile,
)

RULE = DecideSection(z=2.0, confirm=True, alpha=0.001, confirm_runs=5)


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


def test_a_clear_gain_is_kept_after_one_pair_in_the_goal_direction():
    j = judge([0.5, 0.5], [1.0], best=1.0, best_runs=2, noise=0.01, dof=10, goal="minimize", rule=RULE)
    assert j.verdict == "keep" and math.isclose(j.margin, 0.5) and math.isclose(j.sigmas, 50)
    assert j.reason.startswith("confirmed by 1 re-run(s)") and j.probability > 0.999
    assert judge([1.5, 1.5], [1.0], 1.0, 2, 0.01, 10, "maximize", RULE).verdict == "keep"
    assert judge([1.5], [], 1.0, 2, 0.01, 10, "minimize", RULE).verdict == "discard"


def test_a_first_run_is_never_kept_on_its_own():
    # 50 noise with many degrees of freedom: still re-run beside the best, which may have drifted since
    for dof in (1, 100):
        j = judge([0.5], [], best=1.0, best_runs=2, noise=0.01, dof=dof, goal="minimize", rule=RULE)
        assert j.verdict == "confirm" and "re-running it beside the best" in j.reason
    # one degree of freedom: t(0.999, 1) = 318, so one pair proves nothing
    assert judge([0.5, 0.5], [1.0], 1.0, 2, 0.01, 1, "minimize", RULE).verdict == "confirm"


def test_gain_within_the_noise_is_discarded():
    j = judge([0.985], [], best=1.0, best_runs=2, noise=0.01, dof=10, goal="minimize", rule=RULE)
    assert j.verdict == "discard" and "within the noise" in j.reason
    assert j.margin <= bar(0.01, RULE)


def test_min_delta_raises_the_bar():
    rule = DecideSection(min_delta=0.1, z=2.0, confirm=False)
    assert judge([0.95], [], 1.0, 2, 0.001, 10, "minimize", rule).verdict == "discard"
    assert judge([0.85], [], 1.0, 2, 0.001, 10, "minimize", rule).verdict == "keep"


def test_pairs_decide_by_a_t_test_and_stop_after_confirm_runs():
    assert judge([0.97], [], 1.0, 2, 0.01, 20, "minimize", RULE).verdict == "confirm"  # 3 noise: re-run
    lucky_seed = judge([0.97, 1.0], [1.0], 1.0, 2, 0.01, 20, "minimize", RULE)
    assert lucky_seed.verdict == "discard" and lucky_seed.reason.startswith("not confirmed after 1 re-run(s)")
    # one pair 2.6 noise better: not yet beyond t(0.999, 20) = 3.55 standard errors of a difference
    assert judge([0.97, 0.974], [1.0], 1.0, 2, 0.01, 20, "minimize", RULE).verdict == "confirm"
    real = judge([0.97, 0.95, 0.95], [1.0, 1.0], 1.0, 2, 0.01, 20, "minimize", RULE)
    assert real.verdict == "keep" and real.reason.startswith("confirmed by 2 re-run(s)")
    spent = judge([0.97] + [0.979] * 5, [1.0] * 5, 1.0, 2, 0.01, 20, "minimize", RULE)
    assert spent.verdict == "discard" and spent.reason.startswith(
        "not confirmed after 5 re-run(s): the re-runs' mean margin +0.021"
    )
    worse = judge([0.9, 1.02], [1.0], 1.0, 2, 0.01, 20, "minimize", RULE)
    assert worse.verdict == "discard" and worse.reason.startswith("not confirmed")


def test_the_best_re_measured_beside_the_re_runs_decides_not_its_recorded_mean():
    # The machine got faster: the best, recorded at 1.0, now runs at 0.9, as does the candidate.
    drift = judge([0.9, 0.9, 0.9], [0.9, 0.9], 1.0, 2, 0.01, 20, "minimize", RULE)
    assert drift.verdict == "discard" and drift.margin == 0.0
    # The machine got slower: a real gain of 5 noise still shows beside the best's slower runs.
    slower = judge([0.97, 1.05, 1.05, 1.05], [1.1, 1.1, 1.1], 1.0, 2, 0.01, 20, "minimize", RULE)
    assert slower.verdict == "keep" and slower.margin == pytest.approx(0.05)


def test_without_confirmation_the_first_run_must_pass_the_test_alone():
    rule = DecideSection(confirm=False)
    assert judge([0.97], [], 1.0, 2, 0.01, 20, "minimize", rule).verdict == "discard"
    assert judge([0.9], [], 1.0, 2, 0.01, 20, "minimize", rule).verdict == "keep"


def test_judge_runs_pools_the_re_runs_but_not_the_first_run():
    repeats = [[1.0, 1.0002]]
    first, noise = judge_runs([0.99], [], repeats, 1.0001, 2, "minimize", RULE)
    assert noise == pytest.approx(noise_floor([1.0, 1.0002])) and first.verdict == "confirm"
    again, pooled = judge_runs([0.99, 0.97, 1.01], [1.0, 1.0001], repeats, 1.0001, 2, "minimize", RULE)
    assert pooled == pytest.approx(pooled_noise_floor([*repeats, [0.97, 1.01], [1.0, 1.0001]]))
    assert pooled > 10 * noise and again.verdict != "keep"  # the re-runs showed how noisy the metric is


def test_a_run_past_what_the_metric_can_reach_is_quarantined_at_once():
    rule = DecideSection(best_possible=0.0)
    j = judge([-1.0], [], 1.0, 2, 0.01, 20, "minimize", rule)
    assert j.verdict == "quarantine" and "past decide.best_possible 0" in j.quarantine
    assert j.reason.startswith("quarantined, never kept: a run scored -1")
    # also when a re-run gets there, and in the other direction
    assert judge([0.5, -0.1], [1.0], 1.0, 2, 0.01, 20, "minimize", rule).verdict == "quarantine"
    accuracy = DecideSection(best_possible=1.0)
    assert judge([1.2], [], 0.5, 2, 0.01, 20, "maximize", accuracy).verdict == "quarantine"
    assert judge([0.9], [], 0.5, 2, 0.01, 20, "maximize", accuracy).verdict == "confirm"


def test_an_implausible_gain_is_kept_only_after_every_verification_pair_reproduces_it():
    repeats, best = [[1.0, 1.01, 0.99]], 1.0  # noise 0.01: a first run at 0.0 is 100 noise better
    assert implausible(0.0, best, 0.01, "minimize", RULE).startswith("the first run is 100 noise better")
    assert implausible(0.7, best, 0.01, "minimize", RULE) == ""  # 30 noise: a large gain, not implausible
    first, _ = judge_runs([0.0], [], repeats, best, 3, "minimize", RULE)
    assert first.verdict == "confirm" and first.quarantine
    # no early keep: quarantine_runs (3) pairs, however clear the first ones are
    two, _ = judge_runs([0.0, 0.0, 0.001], [1.0, 1.001], repeats, best, 3, "minimize", RULE)
    assert two.verdict == "confirm" and two.reason.startswith("verifying an implausible gain, re-run 2 of 3")
    three, _ = judge_runs([0.0, 0.0, 0.001, 0.0], [1.0, 1.001, 1.0], repeats, best, 3, "minimize", RULE)
    assert three.verdict == "keep" and three.reason.startswith(
        "confirmed by 3 re-run(s), each beyond the bar"
    )
    assert three.quarantine == first.quarantine
    # one pair that shows no gain ends it: quarantined, never kept
    glitch, _ = judge_runs([0.0, 0.0, 0.999], [1.0, 1.0], repeats, best, 3, "minimize", RULE)
    assert glitch.verdict == "quarantine" and "but re-run 2 gained +0.001" in glitch.reason
    # without re-runs there is no verification
    alone, _ = judge_runs([0.0], [], repeats, best, 3, "minimize", DecideSection(confirm=False))
    assert alone.verdict == "quarantine" and "cannot be re-verified" in alone.reason


def test_probability_grows_with_margin_and_runs():
    assert math.isclose(probability_better(0.0, 1.0, 1, 1), 0.5)
    assert probability_better(1.0, 1.0, 1, 1) < probability_better(1.0, 1.0, 2, 3) < 1.0
