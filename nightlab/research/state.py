"""The loop's state as a pure function of the journal: where a run stands after the experiments it recorded.

Resuming a run and continuing one are the same step: after every recorded experiment the loop rebuilds its
state from the journal's `Experiment` records (the source of truth), never from what it remembers. So a
resumed run stands exactly where the killed one stopped, and this module needs no git and no files to test:
hand-made records in, state out.

The other way round, an experiment's record is built from pure pieces too: `draft` (the state it starts
from), `with_proposal`, `execution.with_trials` (what it measured) and `with_judgement`; `history` is the
journal as a proposer sees it.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from nightlab.config import ExperimentSection
from nightlab.research import decide
from nightlab.research.decide import Judgement
from nightlab.research.journal import Experiment
from nightlab.research.proposers.base import PastExperiment, Proposal


@dataclass
class LoopState:
    """What the loop decides with and what the live view and the summary show.

    The first group is the run's identity and setup, set by the loop; the second is rebuilt from the journal
    by `from_journal`; `stop_reason` is set when the loop stops.
    """

    tag: str = ""
    branch: str = ""
    proposer: str = ""
    metric_name: str = ""
    goal: str = "minimize"
    sandboxed: bool = False
    sandbox_reason: str = ""

    baseline: float | None = None  # the mean of the measured baseline runs
    baseline_runs: int = 0
    best: float | None = None
    best_runs: int = 1  # how many runs the best's metric is the mean of
    best_commit: str = ""
    best_latest: float | None = None  # the best as last measured, what a first run must beat (`remeasured`)
    best_latest_runs: int = 1
    noise: float | None = None
    repeats: list[list[float]] = field(default_factory=list)  # runs of the same code, pooled into the noise
    train_limit: float | None = None  # seconds a candidate's training phase may take (see `train_limit`)
    evaluate_limit: float | None = None  # and its evaluation (see `evaluate_limit`)
    baseline_curves: list[list[list[float]]] = field(default_factory=list)  # progress of the baseline runs
    kept_curves: list[list[list[float]]] = field(default_factory=list)  # and of every kept run
    best_curves: list[list[list[float]]] = field(default_factory=list)  # and of the best's first runs
    experiments: int = 0  # candidates recorded, whatever their decision
    keeps: int = 0
    since_keep: int = 0  # candidates recorded since the last keep (or since the baseline)
    decisions: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0
    max_cost_single: float = 0.0  # the most one proposal cost so far: what the next one may cost

    stop_reason: str = ""

    @property
    def keep_rate(self) -> float:
        return self.keeps / self.experiments if self.experiments else 0.0


def from_journal(
    state: LoopState, records: Sequence[Experiment], base_commit: str, experiment: ExperimentSection
) -> LoopState:
    """`state` with everything the journal decides recomputed from `records` (one run's, in order); the
    run's identity, its sandbox and `stop_reason` are kept. Before any measured baseline there is no best,
    noise or time limit; with no kept candidate the best is the baseline's mean at `base_commit`."""
    base = baseline_values(records)
    candidates = [r for r in records if r.kind == "candidate"]
    kept = [r for r in candidates if r.decision == "keep"]
    baseline = statistics.fmean(base) if base else None
    repeats = repeat_groups(records)
    costs = [r.cost_usd or 0.0 for r in records]
    if kept:
        best, best_runs, best_commit = kept[-1].metric, len(kept[-1].metric_runs), kept[-1].commit_sha
    else:
        best, best_runs, best_commit = baseline, len(base), base_commit
    best_commit = best_commit or base_commit
    latest = remeasured(records, best_commit)
    return replace(
        state,
        baseline=baseline,
        baseline_runs=len(base),
        best=best,
        best_runs=max(best_runs, 1),
        best_commit=best_commit,
        best_latest=statistics.fmean(latest) if latest else best,
        best_latest_runs=len(latest) or max(best_runs, 1),
        noise=decide.pooled_noise_floor(repeats) if base else None,
        repeats=repeats,
        train_limit=train_limit(records, experiment) if base else None,
        evaluate_limit=evaluate_limit(records, experiment) if base else None,
        baseline_curves=[
            r.curve for r in records if r.kind == "baseline" and r.decision == "keep" and r.curve
        ],
        kept_curves=[r.curve for r in records if r.decision == "keep" and r.curve],
        best_curves=[
            r.curve for r in records if r.decision == "keep" and r.commit_sha == best_commit and r.curve
        ],
        experiments=len(candidates),
        keeps=len(kept),
        since_keep=since_last_keep(candidates),
        decisions=dict(Counter(r.decision for r in candidates)),
        cost_usd=sum(costs),
        max_cost_single=max(costs, default=0.0),
    )


def since_last_keep(candidates: Sequence[Experiment]) -> int:
    """How many of the candidates came after the last kept one (all of them when none was kept)."""
    last = max((i for i, r in enumerate(candidates) if r.decision == "keep"), default=-1)
    return len(candidates) - 1 - last


def plateaus(candidates: Sequence[Experiment], length: int) -> list[tuple[int, int]]:
    """The first and last number of each run of at least `length` candidates in a row that kept nothing."""
    spans: list[tuple[int, int]] = []
    streak: list[Experiment] = []
    for r in [*candidates, None]:
        if r is not None and r.decision != "keep":
            streak.append(r)
            continue
        if length and len(streak) >= length:
            spans.append((streak[0].number, streak[-1].number))
        streak = []
    return spans


def draft(state: LoopState, run_id: int, number: int, kind: str, **known: Any) -> Experiment:
    """The record of an experiment about to start from `state`: what it is (`known`), the best and the noise
    it is measured against, and whether it runs sandboxed; the outcome is added when it ends."""
    return Experiment(
        run_id,
        number,
        kind,
        noise=state.noise,
        best_before=state.best_latest,
        sandboxed=state.sandboxed,
        sandbox_reason=state.sandbox_reason,
        **known,
    )


def with_proposal(experiment: Experiment, proposal: Proposal) -> Experiment:
    """`experiment` with what its proposal says: the change and why, its knobs, what asking for it cost."""
    usage = proposal.usage
    return replace(
        experiment,
        description=proposal.description,
        patch=proposal.patch,
        patch_format=proposal.patch_format,
        rationale=proposal.rationale,
        params=proposal.params,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost_usd=usage.cost_usd,
    )


def with_judgement(experiment: Experiment, judgement: Judgement, noise: float) -> Experiment:
    """`experiment` with the keep rule's decision and the numbers behind it, `noise` the floor it used."""
    return replace(
        experiment,
        decision=judgement.verdict,
        reason=judgement.reason,
        margin=judgement.margin,
        sigmas=judgement.sigmas,
        probability=judgement.probability,
        noise=noise,
        quarantine=judgement.quarantine or None,
    )


def history(records: Sequence[Experiment]) -> list[PastExperiment]:
    """The run's candidates as a proposer sees them: what was tried (the committed diff where there is one)
    and how it went."""
    return [
        PastExperiment(
            number=r.number,
            description=r.description,
            decision=r.decision,  # type: ignore[arg-type]  # a recorded decision is one of the known ones
            metric=r.metric,
            reason=r.reason,
            patch=r.diff or r.patch or "",
            params=r.params,
            sigmas=r.sigmas,
        )
        for r in records
        if r.kind == "candidate"
    ]


def baseline_values(records: Sequence[Experiment]) -> list[float]:
    """The metric of every measured baseline run (a crashed or interrupted one has none)."""
    return [
        r.metric for r in records if r.kind == "baseline" and r.decision == "keep" and r.metric is not None
    ]


def remeasured(records: Sequence[Experiment], best_commit: str) -> list[float]:
    """The runs of the best beside the last candidate confirmed against it since it became the best, or []:
    the best as the machine measures it now. A first run is screened against them rather than the best's
    recorded mean, so a machine that drifted does not send every change on to confirmation."""
    for r in reversed(records):
        if r.kind == "candidate" and r.commit_sha == best_commit:
            break
        if r.parent_commit == best_commit and r.best_reruns:
            return r.best_reruns
    return []


def repeat_groups(records: Sequence[Experiment]) -> list[list[float]]:
    """Runs of the same code, for the noise floor: the measured baseline runs, then, of every candidate that
    was re-run, its re-runs and the best's beside them (`decide.judge_runs` pools the same). A candidate
    recorded before nightlab re-measured the best counts with all its runs."""
    base = baseline_values(records)
    repeats = []
    for r in records:
        if r.kind == "candidate":
            groups = (r.metric_runs[1:], r.best_reruns) if r.best_reruns else (r.metric_runs,)
            repeats += [g for g in groups if len(g) >= 2]
    return ([base] if base else []) + repeats


def train_limit(records: Sequence[Experiment], experiment: ExperimentSection) -> float:
    """How long a candidate's training phase may take: the baseline's slowest training phase (or the budget,
    if longer), plus `budget_tolerance` of the budget and `startup_allowance_seconds`. Longer is an overrun:
    a change must not buy its gain with time the budget does not give."""
    walls = [r.timings.get("train", 0.0) for r in records if r.kind == "baseline" and r.decision == "keep"]
    reference = max([experiment.budget_seconds, *walls])
    return (
        reference
        + experiment.budget_tolerance * experiment.budget_seconds
        + experiment.startup_allowance_seconds
    )


def evaluate_limit(records: Sequence[Experiment], experiment: ExperimentSection) -> float | None:
    """How long a candidate's evaluate phase may take: the baseline's slowest evaluation, plus
    `evaluate_tolerance` of it and `startup_allowance_seconds`; None without an evaluate step. Longer is an
    overrun: the evaluator runs the model's code, and work done while being scored escapes the budget."""
    if not experiment.evaluate:
        return None
    walls = [r.timings.get("evaluate", 0.0) for r in records if r.kind == "baseline" and r.decision == "keep"]
    return (
        max(walls, default=0.0) * (1 + experiment.evaluate_tolerance) + experiment.startup_allowance_seconds
    )
