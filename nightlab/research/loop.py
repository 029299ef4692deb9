"""The research loop: the cycle of a run (baseline, propose, one experiment, decide, stop rules), resumable.

One `ResearchLoop` drives one run (branch `nightlab/<tag>`): a proposer suggests each change, an `Executor`
(execution.py) runs it, `decide` judges it, the journal records it, and `state.from_journal` rebuilds where
the run stands from the journal after every record. Every experiment is announced in the journal's `pending`
table before anything runs and recorded (clearing the marker) after the workspace is back at the last kept
commit, so a kill at any moment leaves a state the next `nightlab run` can settle exactly:

- an experiment found pending on resume is recorded once as `crash` ("interrupted") and not re-run, so a
  change that kills nightlab itself (e.g. by exhausting memory) cannot trap the run in a retry loop;
- the git state is reset to the last kept commit recorded in the journal (tracked and untracked files);
- baseline results and the noise floor are read back from the journal, not measured again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nightlab.config import NightlabConfig, load_config
from nightlab.errors import NightlabError
from nightlab.research import execution, worktrees
from nightlab.research.confirm import measure_candidate
from nightlab.research.edits import EditError, apply_patch
from nightlab.research.execution import Executor, WrapFactory, with_trials
from nightlab.research.heldout import score_heldout
from nightlab.research.journal import Experiment, HeldoutResult, Journal, Pending, Run
from nightlab.research.live import Observer, SilentView
from nightlab.research.novelty import NoveltyGate, duplicate_reason
from nightlab.research.proposers.base import Outcome, Proposal, ProposalContext, Proposer, ProposerUnavailable
from nightlab.research.state import LoopState, draft, from_journal, history, with_proposal
from nightlab.research.workspace import Workspace, WorkspaceError

BRANCH_PREFIX = "nightlab/"
# Waits between tries while the proposer's service is down: doubling from the first, never above the last.
OUTAGE_BACKOFF_SECONDS = (5.0, 300.0)
INTERRUPTED = "interrupted: nightlab stopped while this experiment ran; recorded on resume, not re-run"


class LoopError(NightlabError, RuntimeError):
    """The loop cannot start or continue; the message says why and what to do."""


@dataclass
class RunOptions:
    """Limits and overrides of one `nightlab run` invocation."""

    tag: str | None = None
    max_experiments: int | None = None  # total proposals recorded in the run, across resumes
    hours: float | None = None  # wall time of this invocation
    max_cost: float | None = None  # total LLM spend of the run, USD
    proposer: str | None = None
    budget: float | None = None
    workers: int | None = None  # experiments at once (default: [parallel] workers)
    ray_address: str | None = None  # the Ray cluster for them (default: [parallel] ray_address)


def default_tag(ws: Workspace, journal: Journal) -> str:
    """The run to continue when on its branch, else today's date."""
    branch = ws.current_branch()
    if branch.startswith(BRANCH_PREFIX) and journal.find_run(branch[len(BRANCH_PREFIX) :]):
        return branch[len(BRANCH_PREFIX) :]
    return time.strftime("%Y-%m-%d")


class ResearchLoop:
    """Drives one run of a workspace; see the module docstring for the resume contract. `run` and `executor`
    exist once `open` has opened the run."""

    run: Run
    executor: Executor

    def __init__(
        self,
        root: Path,
        options: RunOptions | None = None,
        *,
        observer: Observer | None = None,
        proposer: Proposer | None = None,
        wrap_for: WrapFactory | None = None,
        elsewhere: Callable[[], list[str]] | None = None,
    ):
        self.root = Path(root).resolve()
        self.options = options or RunOptions()
        self.view: Observer = observer or SilentView()
        self._proposer = proposer
        self._elsewhere = elsewhere  # lines on what worked on other machines (a hub), shown to the proposer
        self.config: NightlabConfig = load_config(self.root)
        execution.apply_budget(self.config, self.options.budget)
        self.ws = Workspace(self.root, self.config)
        self.state = LoopState(metric_name=self.config.metric.name, goal=self.config.metric.goal)
        if wrap_for is None:
            self.state.sandboxed, self.state.sandbox_reason, wrap_for = execution.sandbox_wrap(self.ws)
        self.wrap_for: WrapFactory = wrap_for
        self.journal = Journal.for_workspace(self.root)
        self._pending: Pending | None = None  # the marker of the experiment in flight
        self.novelty = NoveltyGate(self.ws.editable_at)
        self.last_invalid: str | None = None

    def open(self, *, with_proposer: bool = False) -> bool:
        """Create or resume the run and repair the workspace; return True when resuming.

        `with_proposer` builds the proposer where the files on disk are those of the run's best commit: before
        anything is created for a new run (so a proposer that cannot start leaves nothing behind), after the
        repair for a resumed one (a kill may have left a candidate checked out)."""
        self.ws.exclude_state_dir()
        self.journal.verify_chain()
        tag = self.options.tag or default_tag(self.ws, self.journal)
        branch = BRANCH_PREFIX + tag
        self.ws.git("check-ref-format", "--branch", branch)
        run = self.journal.find_run(tag)
        resumed = run is not None
        if run is None:
            run = self._create_run(tag, branch, with_proposer)
        else:
            self._enter_run(run)
        self.run = run
        self.executor = Executor(self.ws, run, self.view, self.wrap_for, on_start=self._note_process)
        self.state.tag, self.state.branch = run.tag, run.branch
        self._restore_state()
        self._settle_interrupted()
        self.executor.checkout(self.state.best_commit)
        try:
            self.ws.check_harness(run.harness)
        except WorkspaceError as exc:
            raise LoopError(f"{exc}; the harness must stay as it was when run {tag!r} started") from exc
        if with_proposer:
            self._build_proposer()
        return resumed

    def _create_run(self, tag: str, branch: str, with_proposer: bool) -> Run:
        self._refuse_dirty()
        if self.ws.branch_exists(branch):
            raise LoopError(f"branch {branch} exists but the journal has no run {tag!r}; pick another --tag")
        self.ws.editable_files()
        if with_proposer:
            self._build_proposer()
        source, preserved, base = self.ws.current_branch(), self.ws.untracked_entries(), self.ws.head()
        self.ws.checkout_run_branch(branch)
        return self.journal.create_run(
            tag=tag,
            branch=branch,
            source_branch=source,
            base_commit=base,
            config=self.config.model_dump(mode="json"),
            harness=self.ws.harness_hashes(),
            preserved=preserved,
            metric_name=self.config.metric.name,
            goal=self.config.metric.goal,
        )

    def _enter_run(self, run: Run) -> None:
        """Back onto the run's branch: a tree a kill left dirty mid-experiment is repaired, others refused."""
        if self.ws.current_branch() != run.branch or not self.journal.pending(run.id):
            self._refuse_dirty()
        if self.ws.current_branch() != run.branch:
            self.ws.checkout_run_branch(run.branch)

    def _refuse_dirty(self) -> None:
        changes = self.ws.tracked_changes()
        if changes:
            shown = ", ".join(changes[:8]) + (" ..." if len(changes) > 8 else "")
            raise LoopError(
                f"the workspace has uncommitted changes to tracked files ({shown}); commit or stash them "
                "first, nightlab only starts from a clean tree"
            )

    def _restore_state(self) -> None:
        """Rebuild best, noise, counts and spend from the journal (the source of truth)."""
        records = self.journal.experiments(self.run.id)
        self.state = from_journal(self.state, records, self.run.base_commit, self.config.experiment)

    def _settle_interrupted(self) -> None:
        """Record what a kill interrupted, after stopping what it left running (parallel workers' too)."""
        worktrees.clear(self.ws, self.run.tag)
        for marker in self.journal.pending(self.run.id):
            if marker.pgid:
                execution.stop_orphan(marker.pgid, self.root)
            self.journal.record_experiment(replace(marker.experiment, decision="crash", reason=INTERRUPTED))
            self.view.message(f"experiment #{marker.number} was interrupted; recorded as crash")
        self._restore_state()

    def _announce(self, experiment: Experiment) -> None:
        """Mark `experiment` as the one in flight (see `Pending`)."""
        self._pending = Pending(experiment)
        self.journal.mark_pending(self._pending)

    def _note_process(self, pgid: int) -> None:
        """Remember the running phase's process group, so a resume can stop it if nightlab was killed."""
        if self._pending is not None:
            self._pending = replace(self._pending, pgid=pgid)
            self.journal.mark_pending(self._pending)

    def _draft(self, number: int, kind: str, **known: Any) -> Experiment:
        """The record of an experiment starting now (see `state.draft`), logged where its phases log."""
        log_path = str(self.executor.log_path(number))
        return draft(
            self.state, self.run.id, number, kind, log_path=log_path, started_at=time.time(), **known
        )

    def _finish(self, experiment: Experiment) -> Experiment:
        """Record an experiment and clear its marker; the chain is verified before anything is read back (a
        forged row must not steer the run), then the state is rebuilt from the journal."""
        recorded = self.journal.record_experiment(experiment)
        self._pending = None
        self.journal.verify_chain()
        self._restore_state()
        self.view.experiment_finished(recorded, self.state)
        return recorded

    @property
    def proposer(self) -> Proposer:
        assert self._proposer is not None, "open(with_proposer=True) builds it"
        return self._proposer

    def _build_proposer(self) -> None:
        if self._proposer is None:
            from nightlab.research.proposers import make_proposer

            self._proposer = make_proposer(self.config, self.root, self.options.proposer)

    def _check_options(self) -> None:
        """Options that cannot work with this config fail here, before anything is created or run."""
        from nightlab.research.proposers import check_run_options

        kind = self._proposer.name if self._proposer else self.options.proposer
        check_run_options(self.config, kind, self.options.max_cost)

    def run_loop(self) -> LoopState:
        """Open (or resume) the run and experiment until a stop condition; return the final state."""
        try:
            self._check_options()
            resumed = self.open(with_proposer=True)
            self.state.proposer = self.proposer.name
        except BaseException:
            self.journal.close()
            raise
        self.view.started(self.state, resumed)
        started = time.monotonic()
        try:
            self.executor.setup()
            self._baseline()
            self.state.stop_reason = self._experiments(started)
            if self.config.experiment.heldout:
                score_heldout(self.executor, self.journal, self.state, self.config.experiment.heldout)
        except KeyboardInterrupt:
            self.state.stop_reason = "interrupted"
        finally:
            self.executor.checkout(self.state.best_commit)
            self.view.finished(self.state)
            self.journal.close()
        return self.state

    def _experiments(self, started: float) -> str:
        """Candidates until a stop rule, one at a time or on Ray workers (parallel.py); why it stopped."""
        workers = self.options.workers or self.config.parallel.workers
        if workers > 1:
            from nightlab.research.parallel import ParallelExperiments

            return ParallelExperiments(self, workers).run(started)
        while not (reason := self._stop_reason(started)):
            if reason := self._one_experiment():
                break
        return reason

    def _stop_reason(self, started: float, running: int = 0) -> str:
        """Why no further candidate may start, with `running` candidates still in flight; "" if none."""
        opts, st = self.options, self.state
        if opts.max_experiments is not None and st.experiments + running >= opts.max_experiments:
            return f"reached --max-experiments {opts.max_experiments}"
        if opts.hours is not None and time.monotonic() - started >= opts.hours * 3600:
            return f"reached --hours {opts.hours}"
        if (cap := opts.max_cost) is not None and st.cost_usd + st.max_cost_single > cap:
            return f"the next proposal could exceed --max-cost ${cap:.2f} (spent ${st.cost_usd:.4f})"
        if self._on_plateau() and self.config.proposer.on_plateau == "stop":
            return (
                f"plateau: the last {st.since_keep} experiments kept nothing (proposer.plateau_after "
                f"{self.config.proposer.plateau_after}, on_plateau = stop)"
            )
        return ""

    def _baseline(self) -> None:
        """Measure the unmodified code until `decide.baseline_runs` runs (other seeds each) succeeded."""
        want, commit = self.config.decide.baseline_runs, self.run.base_commit
        while (done := self.state.baseline_runs) < want:
            number = self.journal.next_number(self.run.id)
            started = self._draft(
                number, "baseline", commit_sha=commit, description="baseline", proposer="baseline"
            )
            self._announce(started)
            trial = self.executor.trial(number, "baseline", commit, seed_offset=done, limit=None)
            failed = trial.measurement is None
            reason = trial.reason if failed else f"baseline run {done + 1} of {want}"
            self.executor.checkout(commit)
            self._finish(
                replace(with_trials(started, [trial]), decision="crash" if failed else "keep", reason=reason)
            )
            if failed:
                raise LoopError(
                    f"the baseline (unmodified code) failed: {trial.reason}; see {trial.phases[-1].log_path}"
                    ". Fix the workspace, commit, and start again"
                )

    def _context(self, running: list[str] | None = None) -> ProposalContext:
        program = self.root / self.config.workspace.program
        return ProposalContext(
            program=program.read_text(encoding="utf-8") if program.is_file() else "",
            files=self.ws.read_editable(),
            metric_name=self.config.metric.name,
            goal=self.config.metric.goal,
            best_metric=self.state.best,
            noise=self.state.noise,
            history=history(self.journal.experiments(self.run.id)),
            last_invalid_reason=self.last_invalid,
            plateau=self.state.since_keep if self._on_plateau() else 0,
            log_path=self.executor.log_path(self.journal.next_number(self.run.id)),
            elsewhere=self._elsewhere() if self._elsewhere else [],
            running=running or [],
        )

    def _on_plateau(self) -> bool:
        after = self.config.proposer.plateau_after
        return after > 0 and self.state.since_keep >= after

    def _propose(self, running: list[str] | None = None) -> Proposal | str:
        """The next proposal, or why there is none. A proposer whose service is down (an LLM outage that
        outlasted the client's own retries) is tried again, waiting longer each time, for up to
        `proposer.outage_seconds`."""
        patience = self.config.proposer.outage_seconds
        deadline = time.monotonic() + patience
        wait, longest = OUTAGE_BACKOFF_SECONDS
        while True:
            try:
                proposal = self.proposer.propose(self._context(running))
            except ProposerUnavailable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    return (
                        f"the proposer stayed unavailable for {patience:g}s (proposer.outage_seconds): {exc}"
                    )
                pause = min(wait, left)
                self.view.message(f"the proposer is unavailable ({exc}); trying again in {pause:.0f}s")
                time.sleep(pause)
                wait = min(wait * 2, longest)
                continue
            return "the proposer has nothing more to try" if proposal is None else proposal

    def _one_experiment(self) -> str:
        """Run one proposal end to end; return why the run must stop, or "" to go on."""
        proposal = self._propose()
        if isinstance(proposal, str):
            return proposal
        started = self._candidate(proposal)
        self._announce(started)
        outcome = self._evaluate_candidate(started, proposal, self.state.best_commit)
        kept = outcome.decision == "keep" and outcome.commit_sha
        self.executor.checkout(outcome.commit_sha if kept else self.state.best_commit)
        self._conclude(proposal, outcome)
        return ""

    def _candidate(self, proposal: Proposal) -> Experiment:
        """The record of a candidate made from `proposal` against the best, numbered and not yet run."""
        number, parent = self.journal.next_number(self.run.id), self.state.best_commit
        started = self._draft(number, "candidate", parent_commit=parent, proposer=self.proposer.name)
        return with_proposal(started, proposal)

    def _conclude(self, proposal: Proposal, outcome: Experiment) -> Experiment:
        """Record a candidate's outcome and tell the proposer how it went."""
        outcome = self._finish(outcome)
        self.last_invalid = outcome.reason if outcome.decision in ("invalid", "duplicate") else None
        self.proposer.feedback(proposal, Outcome(outcome.decision, self._scored(outcome), outcome.reason))
        return outcome

    def _scored(self, record: Experiment) -> float | None:
        """What the record's code scored: its metric, or for a duplicate the earlier experiment's."""
        if record.decision != "duplicate":
            return record.metric
        earlier = self.novelty.earlier(self.journal.experiments(self.run.id), record)
        return earlier.metric if earlier else None

    def _evaluate_candidate(self, started: Experiment, proposal: Proposal, parent: str) -> Experiment:
        """Validate, commit, run (and confirm) a proposal; its record with the decision."""
        started = self._prepare_candidate(started, proposal, parent)
        if started.decision:
            return started
        self._announce(started)
        judged = measure_candidate(self.executor, self.state, self.config.decide, started)
        return self.executor.checks(judged) if judged.decision == "keep" else judged

    def _prepare_candidate(
        self, started: Experiment, proposal: Proposal, parent: str, running: list[Experiment] | None = None
    ) -> Experiment:
        """Commit the proposal on `parent` (checked out) with its time limits; decided already (`invalid`,
        `duplicate` of a recorded or `running` experiment) when it cannot or need not run."""
        try:
            commit = self._commit(started.number, proposal)
        except (EditError, WorkspaceError) as exc:
            return replace(started, decision="invalid", reason=str(exc))
        started = replace(
            started,
            parent_commit=parent,
            commit_sha=commit,
            diff=self.ws.diff(parent, commit),
            train_limit=self.state.train_limit,
            evaluate_limit=self.state.evaluate_limit,
        )
        measured = [*self.journal.experiments(self.run.id), *(running or [])]
        if earlier := self.novelty.earlier(measured, started):
            return replace(started, decision="duplicate", reason=duplicate_reason(earlier))
        return started

    def _commit(self, number: int, proposal: Proposal) -> str:
        """Apply the proposal to the editable files and commit it; EditError or WorkspaceError if not."""
        self.ws.check_harness(self.run.harness)
        files = apply_patch(self.root, proposal.patch, proposal.patch_format, self.config.workspace.editable)
        self.ws.write_files(files)
        self.ws.check_harness(self.run.harness)
        return self.ws.commit(f"nightlab #{number}: {proposal.description}", sorted(files))

    def final_heldout(self) -> list[HeldoutResult]:
        """Open an existing run and score it on the held-out split if not done yet (`report --final`)."""
        if self.journal.find_run(self.options.tag or "") is None:
            raise LoopError(f"no run {self.options.tag!r} in the journal")
        try:
            self.open()
            if not (command := self.config.experiment.heldout):
                raise LoopError("experiment.heldout is not set in nightlab.toml; nothing to score")
            return score_heldout(self.executor, self.journal, self.state, command)
        finally:
            # Unless open() failed before it knew the run: then its error is the one to see.
            if self.state.best_commit:
                self.executor.checkout(self.state.best_commit)
            self.journal.close()
