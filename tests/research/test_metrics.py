"""The metric channel: signed harness lines count, anything else printed is only logged."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from nightlab.config import MetricSection
from nightlab.harness import sign_metrics
from nightlab.research.metrics import (
    MetricError,
    measure,
    parse_log_metrics,
    read_signed_metrics,
)

KEY = "k" * 64


def test_signed_line_format_is_the_documented_one():
    line = sign_metrics({"val_bpb": 1.25, "eval_seconds": 3}, KEY)
    payload = json.dumps({"eval_seconds": 3.0, "val_bpb": 1.25}, sort_keys=True, separators=(",", ":"))
    assert (
        line
        == f"NIGHTLAB_METRIC {payload} {hmac.new(KEY.encode(), payload.encode(), hashlib.sha256).hexdigest()}"
    )
    assert read_signed_metrics(f"noise\n{line}\nmore noise", KEY) == {"eval_seconds": 3.0, "val_bpb": 1.25}


def test_forged_and_other_key_lines_are_ignored():
    forged = sign_metrics({"val_bpb": 0.01}, "guessed-key")
    good = sign_metrics({"val_bpb": 1.5}, KEY)
    assert read_signed_metrics(f"{good}\n{forged}", KEY) == {"val_bpb": 1.5}
    with pytest.raises(MetricError, match="1 line\\(s\\) with a bad signature"):
        read_signed_metrics(f"val_bpb: 0.01\n{forged}", KEY)


def test_harness_channel_ignores_what_editable_code_prints():
    section = MetricSection(name="loss", extra=["peak_memory_mb"])
    train = "loss: 0.0000001\npeak_memory_mb: 512\n" + sign_metrics({"loss": 0.0}, "not-the-key")
    got = measure(section, train_log=train, evaluate_log=sign_metrics({"loss": 2.5}, KEY), key=KEY)
    assert got.value == 2.5
    assert got.extra == {"peak_memory_mb": 512.0}  # extras may come from the log: informational only


def test_harness_channel_without_signed_line_is_an_error():
    section = MetricSection(name="loss")
    with pytest.raises(MetricError, match="no signed"):
        measure(section, train_log="", evaluate_log="loss: 1.0", key=KEY)
    with pytest.raises(MetricError, match="has no 'loss'"):
        measure(section, train_log="", evaluate_log=sign_metrics({"acc": 1.0}, KEY), key=KEY)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_metrics_are_rejected(value):
    section = MetricSection(name="loss", channel="log")
    with pytest.raises(MetricError, match="not finite"):
        measure(section, train_log=f"loss: {value}", evaluate_log=None, key=None)
    with pytest.raises(MetricError, match="not finite"):
        measure(
            MetricSection(name="loss"),
            train_log="",
            evaluate_log=sign_metrics({"loss": float(value)}, KEY),
            key=KEY,
        )


def test_log_channel_last_match_wins_and_garbage_is_an_error():
    assert parse_log_metrics("loss: 3\nstep\nloss: 2.5e-1\n", ["loss"]) == {"loss": 0.25}
    with pytest.raises(MetricError, match="'banana' is not a number"):
        parse_log_metrics("loss: 1.0\nloss: banana\n", ["loss"])
    with pytest.raises(MetricError, match="no `loss: <number>` line"):
        measure(
            MetricSection(name="loss", channel="log"), train_log="nothing here", evaluate_log=None, key=None
        )


def test_log_channel_custom_pattern():
    section = MetricSection(name="acc", channel="log", pattern=r"accuracy=([0-9.]+)%")
    assert (
        measure(section, train_log="accuracy=91.5%\naccuracy=92.0%", evaluate_log=None, key=None).value
        == 92.0
    )
