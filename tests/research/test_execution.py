"""What an execution adds to an experiment's record, and the session's training budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab.config import ConfigError, NightlabConfig
from nightlab.research import execution
from nightlab.research.execution import Trial, apply_budget, with_trials
from nightlab.research.journal import Experiment
from nightlab.research.metrics import Measurement
from nightlab.research.runner import PhaseResult


def phase(name: str, seconds: float, rss: float, exit_code: int = 0) -> PhaseResult:
    return PhaseResult(name, exit_code, seconds, rss, False, "", Path("x.log"))


def test_the_record_holds_every_run_the_phase_times_in_order_and_the_peak_memory():
    trials = [
        Trial(
            None,
            "",
            Measurement(1.5, {"steps": 10.0}),
            [phase("train", 2.0004, 90), phase("evaluate", 0.5, 40)],
        ),
        Trial(None, "", Measurement(1.0, {"acc": 0.5}), [phase("train (confirm 1)", 2.1, 120)]),
        Trial("crash", "boom", None, [phase("train (confirm 2)", 0.2, 10, exit_code=3)]),
    ]
    record = with_trials(Experiment(1, 4, "candidate", description="d"), trials)
    assert record.metric == 1.25 and record.metric_runs == [1.5, 1.0]
    assert record.extra == {"steps": 10.0, "acc": 0.5}
    assert list(record.timings.items()) == [
        ("train", 2.0),
        ("evaluate", 0.5),
        ("train (confirm 1)", 2.1),
        ("train (confirm 2)", 0.2),
    ]
    assert record.exit_code == 0 and record.peak_rss_mb == 120 and record.description == "d"


def test_runs_of_the_best_beside_the_re_runs_are_recorded_apart():
    trials = [
        Trial(None, "", Measurement(0.9, {"steps": 1.0}), [phase("train", 1.0, 10)]),
        Trial(None, "", Measurement(1.2, {"steps": 2.0}), [phase("train (best 1)", 1.5, 30)], True),
        Trial(None, "", Measurement(1.0), [phase("train (confirm 1)", 1.2, 20)]),
    ]
    record = with_trials(Experiment(1, 3, "candidate"), trials)
    assert record.metric_runs == [0.9, 1.0] and record.metric == pytest.approx(0.95)
    assert record.best_reruns == [1.2] and record.extra == {"steps": 1.0}  # the candidate's own numbers
    assert list(record.timings) == ["train", "train (best 1)", "train (confirm 1)"]
    assert record.peak_rss_mb == 30


def test_a_trial_without_a_measurement_leaves_no_metric():
    record = with_trials(
        Experiment(1, 2, "baseline"), [Trial("timeout", "killed", None, [phase("train", 9, 5)])]
    )
    assert (record.metric, record.metric_runs, record.extra, record.best_reruns) == (None, [], {}, [])


def _config(**experiment: float) -> NightlabConfig:
    return NightlabConfig.model_validate(
        {
            "workspace": {"name": "w", "editable": ["train.py"]},
            "experiment": {"command": "python train.py", "timeout_seconds": 100, **experiment},
            "metric": {"name": "loss"},
        }
    )


@pytest.mark.parametrize(
    ("device", "override", "budget"), [(None, None, 5), ("cuda", None, 7), ("cuda", 3, 3)]
)
def test_the_budget_is_the_option_else_the_gpu_budget_where_an_accelerator_is(
    monkeypatch, device, override, budget
):
    monkeypatch.setattr(execution, "accelerator", lambda: device)
    config = _config(budget_seconds=5, gpu_budget_seconds=7)
    apply_budget(config, override)
    assert config.experiment.budget_seconds == budget


@pytest.mark.parametrize(("override", "words"), [(0, "must be positive"), (101, "raise the timeout")])
def test_a_budget_the_run_cannot_have_is_refused(override, words):
    with pytest.raises(ConfigError, match=words):
        apply_budget(_config(budget_seconds=5), override)
