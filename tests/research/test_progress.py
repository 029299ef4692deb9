"""Reading progress lines into curves, and when a curve is hopeless."""

from __future__ import annotations

import pytest

from nightlab.config import DecideSection
from nightlab.research.progress import (
    AbortRule,
    ProgressWatch,
    abort_rule,
    curve_noise,
    progress_pattern,
    value_at,
)


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("step    10 | loss 3.2500 | lr x1.00", 3.25),
        ("loss: 2", 2.0),
        ("train loss=1e-3 ok", 1e-3),
        ("loss -0.5", -0.5),
        ("val_loss 9.0 | loss 4.0", 4.0),
    ],
)
def test_progress_lines_in_the_usual_shapes_are_read(line, value):
    match = progress_pattern("loss").search(line)
    assert match is not None and float(match.group(1)) == value


@pytest.mark.parametrize("line", ["val_loss 9.0", "loss is nan", "lossy 3.0", "loss 3.0.1", "the loss"])
def test_other_words_and_numbers_are_not_progress(line):
    assert progress_pattern("loss").search(line) is None


def test_a_curve_is_read_between_and_after_its_readings_never_before():
    curve = [[0.1, 4.0], [0.3, 2.0], [0.5, 1.0]]
    assert value_at(curve, 0.05) is None
    assert value_at(curve, 0.2) == pytest.approx(3.0)
    assert value_at(curve, 0.5) == 1.0 and value_at(curve, 0.9) == 1.0


def test_the_noise_is_the_spread_of_the_baseline_repeats():
    a = [[0.0, 5.0], [1.0, 1.0]]
    b = [[0.0, 5.2], [1.0, 1.2]]
    assert curve_noise([a, b], 0.0) == pytest.approx(0.2 / 2**0.5)
    assert curve_noise([a], 0.0) is None


def rule(goal: str = "minimize") -> AbortRule:
    kept = [[[0.0, 5.0], [1.0, 1.0]], [[0.0, 4.0], [1.0, 0.5]]]
    return AbortRule(kept=kept, noise=0.1, goal=goal, after=0.25, sigmas=3.0, readings=2)


def test_hopeless_means_behind_every_kept_curve_by_more_than_the_noise_allows():
    r = rule()
    # At 0.5 the kept curves read 3.0 and 2.25: the worst is 3.0, the line 3.0 + 3 * 0.1.
    assert r.hopeless(0.5, 3.2) is None
    assert r.hopeless(0.5, 3.5) == pytest.approx((3.0, 0.5))
    assert r.hopeless(0.2, 100.0) is None  # too early to judge
    maximize = rule(goal="maximize")  # the worst kept reading is then the lowest, 2.25
    assert maximize.hopeless(0.5, 2.0) is None
    assert maximize.hopeless(0.5, 1.5) == pytest.approx((2.25, 0.75))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_watch_records_the_curve_and_stops_after_readings_in_a_row():
    clock = Clock()
    watch = ProgressWatch("loss", 10.0, rule(), clock=clock)
    for second, value in [(1, 9.0), (3, 9.0), (4, 2.0), (5, 9.0), (6, 9.0), (7, 9.0)]:
        clock.now = 100.0 + second
        watch.feed(f"step | loss {value} |")
        watch.feed("a line without progress")
    assert [f for f, _ in watch.curve] == [0.1, 0.3, 0.4, 0.5, 0.6]  # nothing read once stopped
    assert watch.stop_reason.startswith("aborted at 60% of the budget: loss 9 was behind every kept run's")
    assert "2 readings in a row" in watch.stop_reason


def test_without_a_rule_the_watch_only_records():
    watch = ProgressWatch("loss", 1.0)
    watch.feed("loss 1e9")
    assert watch.curve and not watch.stop_reason


def test_no_rule_without_kept_curves_two_baseline_curves_or_when_switched_off():
    curve = [[0.0, 2.0], [1.0, 1.0]]
    other = [[0.0, 2.1], [1.0, 1.1]]
    on = DecideSection(abort_against="kept")
    assert abort_rule([curve], [], [curve, other], "minimize", on).kept == [curve]
    assert abort_rule([], [curve], [curve, other], "minimize", on) is None
    assert abort_rule([curve], [], [curve], "minimize", on) is None
    assert abort_rule([curve], [], [curve, other], "minimize", DecideSection(early_abort=False)) is None
    best = abort_rule([curve, other], [other], [curve, other], "minimize", DecideSection())
    assert best.kept == [other]  # the default judges against the best's curve
    assert abort_rule([curve], [], [curve, other], "minimize", DecideSection()) is None
