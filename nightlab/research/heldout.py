"""Scoring on the held-out split: the baseline and the best, once each, when a run ends.

Each commit is trained afresh and scored twice from that one training, on validation (`experiment.evaluate`)
and on the test split (`experiment.heldout`), so validation vs test compares like with like; the baseline's
pair tells whether the best's gain on validation carried over to test (see `report.heldout_lines`). The test
split is never seen while the loop decides, and a commit already scored is not scored again.
"""

from __future__ import annotations

from nightlab.research.execution import Executor
from nightlab.research.journal import HeldoutResult, Journal
from nightlab.research.state import LoopState


def score_heldout(
    executor: Executor, journal: Journal, state: LoopState, command: str
) -> list[HeldoutResult]:
    """Score the run's baseline and its best commit with the held-out `command` unless done already; return
    every held-out result of the run. The workspace is left at the best commit."""
    run = executor.run
    done = {h.commit_sha for h in journal.heldout(run.id)}
    for label, commit in (("baseline", run.base_commit), ("best", state.best_commit)):
        if commit in done:
            continue
        done.add(commit)
        result = journal.record_heldout(_score(executor, state, command, label, commit))
        journal.verify_chain()
        executor.view.message(f"held-out {label}: validation {result.validation} test {result.test}")
    executor.checkout(state.best_commit)
    return journal.heldout(run.id)


def _score(executor: Executor, state: LoopState, command: str, label: str, commit: str) -> HeldoutResult:
    name, what = f"heldout-{label}", f"held-out scoring of the {label}"
    trial = executor.trial(
        name,
        what,
        commit,
        seed_offset=0,
        label="heldout",
        limit=state.train_limit,
        evaluate_limit=state.evaluate_limit,
    )
    test = trial
    if trial.measurement is not None:
        test = executor.measure(name, what, "heldout", command, 0, list(trial.phases))
    return HeldoutResult(
        run_id=executor.run.id,
        commit_sha=commit,
        label=label,
        validation=trial.measurement.value if trial.measurement else None,
        test=test.measurement.value if test.measurement else None,
        extra={"reason": test.reason},
        log_path=str(executor.log_path(name)),
        sandboxed=state.sandboxed,
        sandbox_reason=state.sandbox_reason,
    )
