"""The calibration: one positive score per machine, measured once and then read from the cache."""

from __future__ import annotations

from nightlab.hub import calibration


def test_calibration_is_positive_and_cached(tmp_path, monkeypatch):
    first = calibration.calibrate(tmp_path)
    assert first.score > 0 and first.memory_gb >= 0 and first.accelerator
    assert first.workload.startswith("float32 matmul")

    def refuse(device: str | None) -> float:
        raise AssertionError("a cached calibration must not be measured again")

    monkeypatch.setattr(calibration, "_workload_seconds", refuse)
    assert calibration.calibrate(tmp_path) == first


def test_only_time_like_metrics_are_scaled():
    assert calibration.normalise("mean_seconds", 10.0, 2.0) == 20.0
    assert calibration.normalise("latency_ms", 3.0, 0.5) == 1.5
    assert calibration.normalise("val_bpb", 1.1, 2.0) == 1.1
    assert calibration.normalise("accuracy", 0.9, 2.0) == 0.9


def test_the_accelerator_workload_times_a_torch_device_on_one_scale_with_the_cpu():
    """The path a GPU machine takes, run on PyTorch's CPU device: a positive time, and a score that is the
    FLOP rate over the reference's whichever workload measured it."""
    small = calibration.Workload(128, 4, repeats=2)
    seconds = calibration._torch_seconds(small, "cpu")
    assert 0 < seconds < 60
    reference = calibration.CPU_WORKLOAD
    assert calibration.score_of(None, calibration.REFERENCE_SECONDS) == 1.0
    doubled = calibration.REFERENCE_SECONDS / 2 * calibration.ACCELERATOR_WORKLOAD.flops / reference.flops
    assert calibration.score_of("cuda", doubled) == 2.0
