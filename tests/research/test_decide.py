"""The noise-aware keep rule."""

from __future__ import annotations

import math

from nightlab.config import DecideSection
from nightlab.research.decide import bar, judge, noise_floor, probability_better

RULE = DecideSection(z=2.0, confirm=True, confirm_k=4.0)


def test_noise_floor_is_the_sample_std_with_a_floor():
    assert math.isclose(noise_floor([1.0, 1.2, 1.4]), 0.2)
    assert noise_floor([5.0, 5.0]) == 5.0 * 1e-4  # deterministic metric: relative floor, never zero
    assert noise_floor([0.0]) > 0


def test_clear_gain_is_kept_in_the_goal_direction():
    j = judge([0.5], best=1.0, best_runs=2, noise=0.01, goal="minimize", rule=RULE)
    assert j.verdict == "keep" and math.isclose(j.margin, 0.5) and math.isclose(j.sigmas, 50)
    assert j.probability > 0.999
    assert judge([1.5], best=1.0, best_runs=2, noise=0.01, goal="maximize", rule=RULE).verdict == "keep"
    assert judge([1.5], best=1.0, best_runs=2, noise=0.01, goal="minimize", rule=RULE).verdict == "discard"


def test_gain_within_the_noise_is_discarded():
    j = judge([0.985], best=1.0, best_runs=2, noise=0.01, goal="minimize", rule=RULE)
    assert j.verdict == "discard" and "within the noise" in j.reason
    assert j.margin <= bar(0.01, RULE)


def test_min_delta_raises_the_bar():
    rule = DecideSection(min_delta=0.1, z=2.0, confirm=False)
    assert judge([0.95], best=1.0, best_runs=1, noise=0.001, goal="minimize", rule=rule).verdict == "discard"
    assert judge([0.85], best=1.0, best_runs=1, noise=0.001, goal="minimize", rule=rule).verdict == "keep"


def test_small_margin_asks_for_confirmation_and_the_mean_decides():
    first = judge([0.97], best=1.0, best_runs=2, noise=0.01, goal="minimize", rule=RULE)
    assert first.verdict == "confirm"  # 3 noise: above the bar (2), below confirm_k (4)
    lucky_seed = judge([0.97, 1.0], best=1.0, best_runs=2, noise=0.01, goal="minimize", rule=RULE)
    assert lucky_seed.verdict == "discard"
    real = judge([0.97, 0.974], best=1.0, best_runs=2, noise=0.01, goal="minimize", rule=RULE)
    assert real.verdict == "keep" and "confirmed" in real.reason
    assert judge([0.97], 1.0, 2, 0.01, "minimize", DecideSection(confirm=False)).verdict == "keep"


def test_probability_grows_with_margin_and_runs():
    assert math.isclose(probability_better(0.0, 1.0, 1, 1), 0.5)
    assert probability_better(1.0, 1.0, 1, 1) < probability_better(1.0, 1.0, 2, 3) < 1.0
