"""Measuring a candidate until the keep rule decides: its first run, then pairs of the best and itself.

`decide` says what the numbers mean; this module runs what it asks for. After a first run that passes the
bar, the best commit and the candidate run in turn, the two runs of a pair with the same seed offset (so a
change that alters nothing scores exactly as the best does), and the rule judges the pairs' differences.
The best is re-measured in the same period as the candidate's re-runs, so a machine that got faster or
slower since the best was recorded moves both sides alike; the best's runs are recorded in the candidate's
row (`best_reruns`).
"""

from __future__ import annotations

from dataclasses import replace

from nightlab.config import DecideSection
from nightlab.research import decide
from nightlab.research.execution import Executor, Trial, measured, with_trials
from nightlab.research.journal import Experiment
from nightlab.research.progress import abort_rule
from nightlab.research.state import LoopState, with_judgement


def measure_candidate(
    executor: Executor, state: LoopState, rule: DecideSection, started: Experiment
) -> Experiment:
    """Run the committed candidate `started` (its time limits recorded in it) and, while the rule asks for
    it, pairs of the best and the candidate; its record with the decision. A failed run of the candidate
    decides as it failed; a failed run of the best leaves the candidate unconfirmed (discarded)."""
    number, what, commit = started.number, started.description, started.commit_sha
    assert commit is not None, "a candidate is measured once committed"

    def run(sha: str, n: int, label: str, limit: float | None, evaluate_limit: float | None) -> Trial:
        return executor.trial(
            number, what, sha, seed_offset=n, label=label, limit=limit, evaluate_limit=evaluate_limit
        )

    abort = abort_rule(state.kept_curves, state.best_curves, state.baseline_curves, state.goal, rule)
    first = executor.trial(
        number,
        what,
        commit,
        seed_offset=0,
        limit=started.train_limit,
        evaluate_limit=started.evaluate_limit,
        abort=abort,
    )
    trials = [first]
    judgement, noise = None, None
    while trials[-1].failure is None:
        judgement, noise = _judge(trials, state, rule)
        if judgement.verdict != "confirm":
            break
        n = len(trials) // 2 + 1  # the first run, then whole pairs
        best = replace(run(state.best_commit, n, f"best {n}", None, None), remeasures_best=True)
        trials.append(best)
        if best.failure is None:
            trials.append(run(commit, n, f"confirm {n}", started.train_limit, started.evaluate_limit))
    record = with_trials(started, trials)
    if failed := next((t for t in trials if t.failure), None):
        if not failed.remeasures_best:
            return replace(record, decision=failed.failure, reason=failed.reason)
        why = f"not confirmed: the best ({state.best_commit[:7]}) failed when re-measured beside it: "
        return replace(record, decision="discard", reason=why + failed.reason)
    assert judgement is not None and noise is not None
    return with_judgement(record, judgement, noise)


def _judge(trials: list[Trial], state: LoopState, rule: DecideSection) -> tuple[decide.Judgement, float]:
    """The rule's verdict on the runs so far, and the noise floor it used."""
    assert state.best_latest is not None, "candidates come after a measured baseline"
    candidate = measured(t for t in trials if not t.remeasures_best)
    best_now = measured(t for t in trials if t.remeasures_best)
    return decide.judge_runs(
        candidate, best_now, state.repeats, state.best_latest, state.best_latest_runs, state.goal, rule
    )
