"""The tune proposer: finds the numeric knobs, rewrites only their lines, and learns from what it is told."""

from __future__ import annotations

import ast
import math
import re
import statistics
from pathlib import Path

import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from nightlab.research.edits import apply_patch, apply_search_replace, parse_search_replace
from nightlab.research.proposers.base import Outcome, PastExperiment, ProposalContext, Proposer
from nightlab.research.proposers.knobs import find_knobs
from nightlab.research.proposers.tune import KnobRange, TuneProposer, TuneSection

SOURCE = '''"""A training script."""
import math

LR = 3e-4
MIN_LR = 0.01  # floor of the schedule
DEPTH = 4
WD: float = 0.1
USE_AMP = True
NAME = "gpt"
ZERO = 0
NEG = -0.5
TWICE = 1
TWICE = 2
lower = 5
BIG = 1_000
SEED = 42


def train():
    INNER = 7
    return LR * DEPTH * INNER
'''


def context(files: dict[str, str], best: float | None = None, history=None) -> ProposalContext:
    return ProposalContext("tune it", files, "loss", "minimize", best, None, history or [])


def test_knob_discovery_finds_top_level_numeric_constants_only() -> None:
    knobs = find_knobs({"train.py": SOURCE, "README.md": "X = 1\n"})
    assert {n: k.value for n, k in knobs.items()} == {
        "LR": 3e-4,
        "MIN_LR": 0.01,
        "DEPTH": 4,
        "WD": 0.1,
        "ZERO": 0,
        "NEG": -0.5,
        "BIG": 1000,
        "SEED": 42,
    }
    assert (
        knobs["LR"].literal == "3e-4" and knobs["BIG"].literal == "1_000" and knobs["NEG"].literal == "-0.5"
    )
    assert knobs["MIN_LR"].lineno == 5


def test_knobs_defined_in_two_files_are_left_out() -> None:
    knobs = find_knobs({"train.py": SOURCE, "model.py": "DEPTH = 3\nWIDTH = 64\n"})
    assert "DEPTH" not in knobs and knobs["WIDTH"].path == "model.py"


def test_default_ranges_skip_zero_negative_values_and_seeds() -> None:
    tuner = TuneProposer(TuneSection(), {"train.py": SOURCE}, "minimize")
    assert set(tuner.space) == {"LR", "MIN_LR", "DEPTH", "WD", "BIG"}
    assert tuner.space["LR"] == FloatDistribution(3e-4 / 4, 3e-4 * 4, log=True)
    assert tuner.space["DEPTH"] == IntDistribution(2, 8)


def test_configured_knobs_replace_discovery_and_unknown_names_fail_clearly() -> None:
    config = TuneSection(knobs={"LR": KnobRange(low=1e-5, high=1e-2, log=True)})
    assert set(TuneProposer(config, {"train.py": SOURCE}, "minimize").space) == {"LR"}
    with pytest.raises(ValueError, match=r"\['BATCH'\].*no top-level `NAME = number`"):
        TuneProposer(TuneSection(knobs={"BATCH": KnobRange(low=1, high=8)}), {"train.py": SOURCE}, "minimize")
    with pytest.raises(ValueError, match="nothing to tune"):
        TuneProposer(TuneSection(), {"train.py": "print('hi')\n"}, "minimize")


def test_proposals_change_only_the_knob_lines(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(SOURCE)
    tuner = TuneProposer(TuneSection(seed=3), {"train.py": SOURCE}, "minimize")
    assert isinstance(tuner, Proposer)
    knob_lines = {k.lineno for k in find_knobs({"train.py": SOURCE}).values()}
    for _ in range(5):
        proposal = tuner.propose(context({"train.py": SOURCE}))
        assert proposal is not None and proposal.patch_format == "search_replace"
        new = apply_patch(tmp_path, proposal.patch, "search_replace", ["train.py"])["train.py"]
        old_lines, new_lines = SOURCE.splitlines(), new.splitlines()
        changed = {i + 1 for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b}
        assert changed and changed <= knob_lines
        assert re.fullmatch(r"tune: \w+ \S+ -> \S+(, \w+ \S+ -> \S+)*", proposal.description)
        ast.parse(new)  # still valid Python, with each value in range and of the same type
        written = {name: knob.value for name, knob in find_knobs({"train.py": new}).items()}
        for name, value in proposal.params.items():
            assert tuner.space[name]._contains(value)
            if name in written:
                assert written[name] == pytest.approx(value)
        assert isinstance(written["DEPTH"], int) and isinstance(written["LR"], float)
        assert "MIN_LR = " in new and "# floor of the schedule" in new


def test_a_constant_whose_line_also_ends_another_is_matched_in_the_right_place() -> None:
    files = {"train.py": "import os\nLR = 0.01\nMIN_LR = 0.01\n"}
    tuner = TuneProposer(
        TuneSection(knobs={"LR": KnobRange(low=0.001, high=0.1, log=True)}), files, "minimize"
    )
    proposal = tuner.propose(context(files))
    new = apply_search_replace(files, parse_search_replace(proposal.patch))["train.py"]
    assert new.endswith("\nMIN_LR = 0.01\n") and f"\nLR = {proposal.description.split()[-1]}\n" in new


def test_knobs_are_located_again_when_the_files_change() -> None:
    files = {"train.py": SOURCE}
    tuner = TuneProposer(TuneSection(seed=1), files, "minimize")
    first = tuner.propose(context(files))
    tuner.feedback(first, Outcome("keep", 1.0))
    moved = apply_search_replace(files, parse_search_replace(first.patch))
    moved["train.py"] = "# a new comment shifts every line\n\n" + moved["train.py"]
    second = tuner.propose(context(moved, best=1.0))
    new = apply_search_replace(moved, parse_search_replace(second.patch))["train.py"]
    assert new.startswith("# a new comment shifts every line\n")
    for part in second.description.removeprefix("tune: ").split(", "):
        name, old, _, value = part.split()
        assert re.search(rf"^{name}(: float)? = {re.escape(old)}\b", moved["train.py"], re.M)
        assert re.search(rf"^{name}(: float)? = {re.escape(value)}\b", new, re.M)


def objective(files: dict[str, str]) -> float:
    """A smooth bowl with its minimum at LR=0.003, DEPTH=6 (the start is LR=0.01, DEPTH=4)."""
    knobs = find_knobs(files)
    return (math.log10(knobs["LR"].value / 0.003)) ** 2 + ((knobs["DEPTH"].value - 6) / 3) ** 2


def run_tuner(seed: int, trials: int) -> list[float]:
    best = {"train.py": "LR = 0.01\nDEPTH = 4\n"}
    best_metric = objective(best)
    tuner = TuneProposer(TuneSection(seed=seed), best, "minimize")
    metrics = []
    for _ in range(trials):
        proposal = tuner.propose(context(best, best=best_metric))
        candidate = {**best, **apply_search_replace(best, parse_search_replace(proposal.patch))}
        metric = objective(candidate)
        metrics.append(metric)
        keep = metric < best_metric
        tuner.feedback(proposal, Outcome("keep" if keep else "discard", metric))
        if keep:
            best, best_metric = candidate, metric
    return metrics


def test_tpe_learns_on_a_synthetic_objective() -> None:
    metrics = run_tuner(seed=0, trials=30)
    assert min(metrics) < statistics.median(metrics[:5])
    # After its 10 random start-up trials TPE samples near the good ones: the later trials are better.
    assert statistics.mean(metrics[-10:]) < statistics.mean(metrics[:10])
    assert run_tuner(seed=0, trials=8) == metrics[:8], "a fixed seed must give the same trials"


def test_failures_are_told_as_failed_trials() -> None:
    files = {"train.py": SOURCE}
    tuner = TuneProposer(TuneSection(), files, "maximize")
    decisions = ["crash", "timeout", "invalid", "overrun", "discard", "keep"]
    for decision in decisions:
        proposal = tuner.propose(context(files))
        metric = None if decision in ("crash", "timeout", "invalid") else 0.5
        tuner.feedback(proposal, Outcome(decision, metric, reason="boom"))
    states = [t.state for t in tuner.study.trials]
    assert states == [TrialState.FAIL] * 4 + [TrialState.COMPLETE] * 2
    assert tuner.study.direction.name == "MAXIMIZE" and tuner.study.best_value == 0.5
    other = tuner.propose(context(files))
    tuner.feedback(other.__class__("someone else's change", "patch"), Outcome("keep", 9.0))  # ignored
    assert tuner.study.trials[-1].state == TrialState.RUNNING


def test_no_op_trials_are_not_proposed_and_max_trials_ends_the_tuner() -> None:
    files = {"train.py": "A = 1\n"}
    config = TuneSection(knobs={"A": KnobRange(low=1, high=2, integer=True)})
    tuner = TuneProposer(config, files, "minimize", max_trials=4)
    proposals = [tuner.propose(context(files, best=1.0)) for _ in range(5)]
    assert [p.description for p in proposals[:4]] == ["tune: A 1 -> 2"] * 4
    assert proposals[4] is None


def test_reads_the_editable_files_of_a_workspace_and_learns_from_history(tmp_path: Path) -> None:
    (tmp_path / "nightlab.toml").write_text(
        '[workspace]\neditable = ["train.py"]\n[experiment]\ncommand = "python train.py"\n'
        '[metric]\nname = "loss"\n'
    )
    (tmp_path / "train.py").write_text("LR = 0.01\n")
    (tmp_path / "prepare.py").write_text("SEQ_LEN = 256\n")
    tuner = TuneProposer(TuneSection(), tmp_path, "minimize")
    assert set(tuner.space) == {"LR"}  # the harness's constants are not knobs
    history = [
        PastExperiment(1, "tune: LR 0.01 -> 0.02", "discard", 2.5, params={"LR": 0.02}),
        PastExperiment(2, "tune: LR 0.01 -> 0.005", "crash", None, params={"LR": 0.005}),
        PastExperiment(3, "rewrote the optimizer", "keep", 2.0),
    ]
    tuner.propose(context({"train.py": "LR = 0.01\n"}, best=2.0, history=history))
    done = [(t.params, t.state) for t in tuner.study.trials[:2]]
    assert done == [({"LR": 0.02}, TrialState.COMPLETE), ({"LR": 0.005}, TrialState.FAIL)]
