"""The loop's state as a pure function of journal records: hand-made records in, state out, no git."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest

from nightlab.config import ExperimentSection
from nightlab.research import decide
from nightlab.research.decide import Judgement
from nightlab.research.journal import Experiment
from nightlab.research.proposers.base import Proposal, Usage
from nightlab.research.state import (
    LoopState,
    draft,
    evaluate_limit,
    from_journal,
    history,
    remeasured,
    repeat_groups,
    train_limit,
    with_judgement,
    with_proposal,
)

BASE = "b" * 40
EXP = ExperimentSection(
    command="python train.py",
    evaluate="python score.py",
    budget_seconds=10.0,
    budget_tolerance=0.1,
    startup_allowance_seconds=2.0,
    evaluate_tolerance=0.5,
)


def baseline(number: int, metric: float | None, train: float = 9.0, evaluate: float = 1.0) -> Experiment:
    decision = "keep" if metric is not None else "crash"
    runs = [metric] if metric is not None else []
    return Experiment(
        1,
        number,
        "baseline",
        decision=decision,
        commit_sha=BASE,
        metric=metric,
        metric_runs=runs,
        timings={"train": train, "evaluate": evaluate},
    )


def candidate(
    number: int, decision: str, runs: list[float], cost: float | None = None, best: list[float] | None = None
) -> Experiment:
    return Experiment(
        1,
        number,
        "candidate",
        decision=decision,
        commit_sha=f"{number:040d}",
        metric=statistics.fmean(runs) if runs else None,
        metric_runs=runs,
        best_reruns=best or [],
        cost_usd=cost,
        description=f"change {number}",
        patch=f"patch {number}",
        diff=f"diff {number}" if runs else None,
    )


def state_of(records: list[Experiment], state: LoopState | None = None) -> LoopState:
    return from_journal(state or LoopState(), records, BASE, EXP)


def test_before_any_baseline_there_is_no_best_noise_or_limit():
    st = state_of([baseline(1, None)])  # a baseline that crashed measured nothing
    assert (st.baseline, st.best, st.noise, st.train_limit, st.evaluate_limit) == (None,) * 5
    assert st.best_commit == BASE and st.baseline_runs == 0 and st.best_runs == 1
    assert (st.experiments, st.keeps, st.decisions, st.cost_usd) == (0, 0, {}, 0.0)


def test_baselines_set_the_best_the_noise_and_the_training_limit():
    records = [baseline(1, 1.0, train=9.0), baseline(2, 1.2, train=12.0), baseline(3, 1.1, train=8.0)]
    st = state_of(records)
    assert st.baseline == st.best == pytest.approx(1.1) and st.best_runs == st.baseline_runs == 3
    assert st.noise == pytest.approx(decide.noise_floor([1.0, 1.2, 1.1])) and st.repeats == [[1.0, 1.2, 1.1]]
    # The slowest baseline training (12 s, over the 10 s budget) + 10% of the budget + the startup allowance.
    assert st.train_limit == pytest.approx(12.0 + 1.0 + 2.0)
    assert train_limit(records[:1], EXP) == pytest.approx(10.0 + 1.0 + 2.0)  # the budget when it is longer


def test_the_evaluate_limit_is_the_baselines_slowest_evaluation_plus_tolerance_and_allowance():
    records = [baseline(1, 1.0, evaluate=4.0), baseline(2, 1.2, evaluate=6.0), baseline(3, None, evaluate=60)]
    st = state_of(records)
    assert st.evaluate_limit == evaluate_limit(records, EXP) == pytest.approx(6.0 * 1.5 + 2.0)
    # a crashed baseline's evaluation does not count, and without an evaluate step there is no limit
    assert evaluate_limit(records, EXP.model_copy(update={"evaluate": None})) is None


def test_the_last_keep_is_the_best_and_confirmed_candidates_join_the_noise_pool():
    records = [
        baseline(1, 1.0),
        baseline(2, 1.2),
        candidate(3, "keep", [0.8, 0.7, 0.75], cost=0.25),
        candidate(4, "discard", [0.7, 0.9], cost=0.5),
        candidate(5, "crash", [], cost=0.125),
        candidate(6, "keep", [0.5]),
        candidate(7, "invalid", []),
    ]
    st = state_of(records)
    assert st.best == 0.5 and st.best_runs == 1 and st.best_commit == f"{6:040d}"
    assert st.baseline == pytest.approx(1.1) and st.baseline_runs == 2
    assert st.repeats == [[1.0, 1.2], [0.8, 0.7, 0.75], [0.7, 0.9]] == repeat_groups(records)
    assert st.noise == pytest.approx(decide.pooled_noise_floor(st.repeats))
    assert (st.experiments, st.keeps) == (5, 2) and st.keep_rate == pytest.approx(0.4)
    assert st.decisions == {"keep": 2, "discard": 1, "crash": 1, "invalid": 1}
    assert st.cost_usd == pytest.approx(0.875) and st.max_cost_single == 0.5
    earlier = state_of(records[:3])  # the keep before: its mean over the confirmation re-runs
    assert earlier.best == pytest.approx(0.75) and earlier.best_runs == 3


def test_paired_re_runs_pool_the_candidates_re_runs_and_the_bests_not_the_first_run():
    records = [
        baseline(1, 1.0),
        baseline(2, 1.2),
        candidate(3, "discard", [0.5, 1.1, 1.0], best=[1.05, 1.15]),
        candidate(4, "keep", [0.8, 0.85], best=[1.1]),  # one re-run, one run of the best: no group
        candidate(5, "discard", [0.7, 0.9]),  # recorded before the best was re-measured: all its runs
    ]
    assert repeat_groups(records) == [[1.0, 1.2], [1.1, 1.0], [1.05, 1.15], [0.7, 0.9]]
    assert state_of(records).best == pytest.approx(0.825)


def test_a_first_run_must_beat_the_best_as_last_measured():
    def paired(number: int, decision: str, parent: str, best: list[float]) -> Experiment:
        return replace(candidate(number, decision, [0.5, 0.6], best=best), parent_commit=parent)

    records = [baseline(1, 1.0), baseline(2, 1.2)]
    assert (state_of(records).best_latest, state_of(records).best_latest_runs) == (pytest.approx(1.1), 2)
    # The baseline re-measured beside a candidate (the machine got faster): that is the level to beat now.
    records.append(paired(3, "discard", BASE, [0.9, 0.8]))
    st = state_of(records)
    assert (
        st.best == pytest.approx(1.1) and st.best_latest == pytest.approx(0.85) and st.best_latest_runs == 2
    )
    assert remeasured(records, BASE) == [0.9, 0.8]
    assert draft(st, 1, 4, "candidate").best_before == pytest.approx(0.85)
    # A keep starts afresh from its own runs; re-measurements of it come from candidates whose parent it is.
    records.append(paired(4, "keep", BASE, [0.8]))
    assert state_of(records).best_latest == state_of(records).best == pytest.approx(0.55)
    records.append(paired(5, "discard", f"{4:040d}", [0.52]))
    assert state_of(records).best_latest == pytest.approx(0.52) and state_of(records).best_latest_runs == 1


def test_what_the_journal_does_not_decide_is_kept():
    identity = LoopState(
        tag="t", branch="nightlab/t", proposer="tune", sandboxed=True, sandbox_reason="bwrap", stop_reason="x"
    )
    st = state_of([baseline(1, 1.0), baseline(2, 1.2)], identity)
    assert (st.tag, st.branch, st.proposer, st.sandboxed, st.sandbox_reason, st.stop_reason) == (
        "t",
        "nightlab/t",
        "tune",
        True,
        "bwrap",
        "x",
    )
    assert identity.best is None  # a new state, not the old one changed


def test_the_same_records_always_give_the_same_state():
    records = [baseline(1, 1.0), baseline(2, 1.2), candidate(3, "keep", [0.8, 0.7])]
    assert state_of(records) == state_of(list(records)) == state_of(records, state_of(records[:1]))


def test_history_shows_candidates_with_the_committed_diff_where_there_is_one():
    past = history([baseline(1, 1.0), candidate(2, "keep", [0.9]), candidate(3, "invalid", [])])
    assert [(p.number, p.decision, p.patch) for p in past] == [
        (2, "keep", "diff 2"),
        (3, "invalid", "patch 3"),
    ]


def test_a_candidate_record_is_built_from_the_state_the_proposal_and_the_judgement():
    st = state_of([baseline(1, 1.0), baseline(2, 1.2)], LoopState(sandboxed=True, sandbox_reason="bwrap"))
    started = draft(st, 1, 3, "candidate", parent_commit=BASE, proposer="llm", started_at=5.0)
    assert (started.best_before, started.noise, started.sandboxed) == (st.best, st.noise, True)
    usage = Usage(prompt_tokens=7, completion_tokens=3, cost_usd=0.01)
    proposal = Proposal("lower the LR", "patch", rationale="why", usage=usage, params={"LR": 0.1})
    proposed = with_proposal(started, proposal)
    assert (proposed.description, proposed.patch, proposed.rationale, proposed.params) == (
        "lower the LR",
        "patch",
        "why",
        {"LR": 0.1},
    )
    assert (proposed.prompt_tokens, proposed.completion_tokens, proposed.cost_usd) == (7, 3, 0.01)
    judged = with_judgement(proposed, Judgement("keep", 0.3, 4.0, 0.99, "clear gain"), 0.075)
    assert judged.quarantine is None
    held = Judgement("keep", 3.0, 60.0, 0.99, "confirmed", quarantine="the first run is 60 noise better")
    assert with_judgement(proposed, held, 0.05).quarantine == "the first run is 60 noise better"
    assert (judged.decision, judged.reason, judged.margin, judged.sigmas, judged.noise) == (
        "keep",
        "clear gain",
        0.3,
        4.0,
        0.075,
    )
    assert judged.parent_commit == BASE and judged.started_at == 5.0
