"""The calibration: one positive score per machine, measured once and then read from the cache."""

from __future__ import annotations

from nightlab.hub import calibration


def test_calibration_is_positive_and_cached(tmp_path, monkeypatch):
    first = calibration.calibrate(tmp_path)
    assert first.score > 0 and first.memory_gb >= 0 and first.accelerator
    assert first.workload == calibration.WORKLOAD

    def refuse() -> float:
        raise AssertionError("a cached calibration must not be measured again")

    monkeypatch.setattr(calibration, "_workload_seconds", refuse)
    assert calibration.calibrate(tmp_path) == first


def test_only_time_like_metrics_are_scaled():
    assert calibration.normalise("mean_seconds", 10.0, 2.0) == 20.0
    assert calibration.normalise("latency_ms", 3.0, 0.5) == 1.5
    assert calibration.normalise("val_bpb", 1.1, 2.0) == 1.1
    assert calibration.normalise("accuracy", 0.9, 2.0) == 0.9
