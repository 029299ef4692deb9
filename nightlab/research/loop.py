"""The research loop: propose, validate, commit, run, measure, decide, record; resumable from the journal.

One `ResearchLoop` drives one run (branch `nightlab/<tag>`). Every experiment is announced in the journal's
`pending` table before anything runs and recorded (clearing the marker) after the workspace is back at the
last kept commit, so a kill at any moment leaves a state the next `nightlab run` can settle exactly:

- an experiment found pending on resume is recorded once as `crash` ("interrupted") and not re-run, so a
  change that kills nightlab itself (e.g. by exhausting memory) cannot trap the run in a retry loop;
- the git state is reset to the last kept commit recorded in the journal (tracked and untracked files);
- baseline results and the noise floor are read back from the journal, not measured again.

The harness is checked against the hashes taken when the run started before every training phase. After
training and after each evaluation the harness, the committed code and the workspace outside the scratch
paths must be as they were, so a phase that changed any of them (a harness file, possible only without the
sandbox; train.py rewriting itself; a file planted for a later phase) never gets its change scored: the
experiment is recorded as `invalid`. A candidate's training phase may take as long as the baseline's slowest
(see `_train_limit`); longer is an `overrun`.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from nightlab.config import ConfigError, NightlabConfig, load_config
from nightlab.hardware import accelerator
from nightlab.research import decide
from nightlab.research.edits import EditError, apply_patch
from nightlab.research.journal import STATE_DIR, Journal, Run
from nightlab.research.metrics import Measurement, MetricError, measure
from nightlab.research.proposers.base import (
    Outcome,
    PastExperiment,
    Proposal,
    ProposalContext,
    Proposer,
    ProposerUnavailable,
)
from nightlab.research.runner import PhaseResult, Wrap, clean_env, kill_group, run_phase
from nightlab.research.workspace import Workspace, WorkspaceError

# Given a phase kind and its complete environment, the argv wrapper to run it with (a sandbox), or None.
WrapFactory = Callable[[str, dict[str, str]], Wrap | None]

BRANCH_PREFIX = "nightlab/"
SETUP_TIMEOUT_SECONDS = 3600.0
# Waits between tries while the proposer's service is down: doubling from the first, never above the last.
OUTAGE_BACKOFF_SECONDS = (5.0, 300.0)
INTERRUPTED = "interrupted: nightlab stopped while this experiment ran; recorded on resume, not re-run"


class LoopError(RuntimeError):
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


@dataclass
class LoopState:
    """What the live view and the summary show; rebuilt from the journal on resume."""

    tag: str = ""
    branch: str = ""
    proposer: str = ""
    metric_name: str = ""
    goal: str = "minimize"
    sandboxed: bool = False
    sandbox_reason: str = ""
    baseline: float | None = None
    best: float | None = None
    best_runs: int = 1
    best_commit: str = ""
    noise: float | None = None
    train_limit: float | None = None  # seconds a candidate's training phase may take (see `_train_limit`)
    experiments: int = 0
    keeps: int = 0
    cost_usd: float = 0.0
    max_cost_single: float = 0.0
    stop_reason: str = ""
    decisions: dict[str, int] = field(default_factory=dict)

    @property
    def keep_rate(self) -> float:
        return self.keeps / self.experiments if self.experiments else 0.0


class Observer(Protocol):
    """What a view of the loop hears about; `live.py` implements it for terminals and plain logs."""

    def started(self, state: LoopState, resumed: bool) -> None: ...
    def phase_started(self, number: int | str, description: str, phase: str, limit: float) -> None: ...
    def output(self, line: str) -> None: ...
    def experiment_finished(self, row: dict[str, Any], state: LoopState) -> None: ...
    def message(self, text: str) -> None: ...
    def finished(self, state: LoopState) -> None: ...


class _Silent(Observer):
    """Hears everything and shows nothing (the protocol's empty bodies), for runs without a view."""


@dataclass
class Trial:
    """One execution of a commit: its phases, and either a measurement or why there is none."""

    failure: str | None  # None, or a decision: crash | timeout | overrun | invalid
    reason: str
    measurement: Measurement | None
    phases: list[PhaseResult]

    @property
    def exit_code(self) -> int | None:
        return self.phases[0].exit_code if self.phases else None


def default_tag(ws: Workspace, journal: Journal) -> str:
    """The run to continue when on its branch, else today's date."""
    branch = ws.current_branch()
    if branch.startswith(BRANCH_PREFIX) and journal.find_run(branch[len(BRANCH_PREFIX) :]):
        return branch[len(BRANCH_PREFIX) :]
    return time.strftime("%Y-%m-%d")


class ResearchLoop:
    """Drives one run of a workspace; see the module docstring for the resume contract."""

    def __init__(
        self,
        root: Path,
        options: RunOptions | None = None,
        *,
        observer: Observer | None = None,
        proposer: Proposer | None = None,
        wrap_for: WrapFactory | None = None,
    ):
        self.root = Path(root).resolve()
        self.options = options or RunOptions()
        self.view: Observer = observer or _Silent()
        self._proposer = proposer
        self.wrap_for: WrapFactory = wrap_for or (lambda phase, env: None)
        self.config: NightlabConfig = load_config(self.root)
        gpu_budget = self.config.experiment.gpu_budget_seconds
        if self.options.budget is not None:
            self._override_budget(self.options.budget)
        elif gpu_budget is not None and accelerator():
            self.config.experiment.budget_seconds = gpu_budget
        self.ws = Workspace(self.root, self.config)
        self.state = LoopState(metric_name=self.config.metric.name, goal=self.config.metric.goal)
        if wrap_for is None:
            self.state.sandboxed, self.state.sandbox_reason, self.wrap_for = self._sandbox()
        self.journal = Journal.for_workspace(self.root)
        self.run_row: Run | None = None
        self.repeats: list[list[float]] = []  # runs of the same code, pooled into the noise floor
        self.preserved: list[str] = []
        self.last_invalid: str | None = None
        self._pending: tuple[int, dict[str, Any]] | None = None  # the experiment in flight and its marker

    def _sandbox(self) -> tuple[bool, str, WrapFactory]:
        """The bubblewrap jail per `[sandbox] mode`; "required" without a working bwrap raises here."""
        from nightlab.research import sandbox

        on, reason = sandbox.resolve_mode(self.config.sandbox.mode)
        if not on:
            return False, reason, lambda phase, env: None

        def wrap_for(phase: str, env: dict[str, str]) -> Wrap:
            files = [self.root / rel for rel in self.ws.editable_files()]
            return sandbox.spec_for_phase(self.config, self.root, phase, files, env).wrap  # type: ignore[arg-type]

        return True, reason, wrap_for

    def _override_budget(self, budget: float) -> None:
        exp = self.config.experiment
        if budget <= 0:
            raise ConfigError(f"--budget must be positive, got {budget}")
        if budget > exp.timeout_seconds:
            raise ConfigError(
                f"--budget {budget} exceeds experiment.timeout_seconds ({exp.timeout_seconds}); raise the timeout"
            )
        exp.budget_seconds = budget

    # --- opening a run ---------------------------------------------------------------------------------

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
            self._refuse_dirty()
            if self.ws.branch_exists(branch):
                raise LoopError(
                    f"branch {branch} exists but the journal has no run {tag!r}; pick another --tag"
                )
            self.ws.editable_files()
            if with_proposer:
                self._build_proposer()
            source = self.ws.current_branch()
            preserved = self.ws.untracked_entries()
            base = self.ws.head()
            self.ws.checkout_run_branch(branch)
            run = self.journal.create_run(
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
        else:
            pending = self.journal.pending(run.id)
            if self.ws.current_branch() != run.branch or not pending:
                self._refuse_dirty()
            if self.ws.current_branch() != run.branch:
                self.ws.checkout_run_branch(run.branch)
        self.run_row = run
        self.preserved = list(run.preserved)
        self._restore_state()
        self._settle_interrupted()
        self.ws.reset_to(self.state.best_commit, self.preserved)
        try:
            self.ws.check_harness(run.harness)
        except WorkspaceError as exc:
            raise LoopError(f"{exc}; the harness must stay as it was when run {tag!r} started") from exc
        if with_proposer:
            self._build_proposer()
        return resumed

    def _refuse_dirty(self) -> None:
        changes = self.ws.tracked_changes()
        if changes:
            shown = ", ".join(changes[:8]) + (" ..." if len(changes) > 8 else "")
            raise LoopError(
                f"the workspace has uncommitted changes to tracked files ({shown}); commit or stash them "
                "first, nightlab only starts from a clean tree"
            )

    @property
    def run(self) -> Run:
        assert self.run_row is not None, "call open() first"
        return self.run_row

    def _restore_state(self) -> None:
        """Rebuild best, noise, counts and spend from the journal (the source of truth)."""
        run, st = self.run, self.state
        st.tag, st.branch = run.tag, run.branch
        st.best_commit = run.base_commit
        rows = self.journal.experiments(run.id)
        base = [r["metric"] for r in rows if r["kind"] == "baseline" and r["decision"] == "keep"]
        self.repeats = decide.repeat_groups(rows)
        if base:
            st.baseline = st.best = statistics.fmean(base)
            st.best_runs = len(base)
            st.noise = decide.pooled_noise_floor(self.repeats)
            st.train_limit = self._train_limit(rows)
        st.experiments = st.keeps = 0
        st.cost_usd = 0.0
        st.decisions = {}
        for r in rows:
            st.cost_usd += r["cost_usd"] or 0.0
            st.max_cost_single = max(st.max_cost_single, r["cost_usd"] or 0.0)
            if r["kind"] != "candidate":
                continue
            st.experiments += 1
            st.decisions[r["decision"]] = st.decisions.get(r["decision"], 0) + 1
            if r["decision"] == "keep":
                st.keeps += 1
                st.best = r["metric"]
                st.best_runs = len(json.loads(r["metric_runs_json"] or "[0]"))
                st.best_commit = r["commit_sha"]

    def _record(self, row: dict[str, Any]) -> None:
        self.journal.record_experiment(row)
        self._pending = None

    def _mark_pending(self, number: int, payload: dict[str, Any]) -> None:
        self._pending = (number, payload)
        self.journal.mark_pending(self.run.id, number, payload)

    def _note_process(self, pgid: int) -> None:
        """Remember the running phase's process group, so a resume can stop it if nightlab was killed."""
        if self._pending is not None:
            number, payload = self._pending
            self._mark_pending(number, {**payload, "pgid": pgid})

    def _group_works_here(self, pgid: int) -> bool:
        """Is that process group still alive with its cwd in this workspace (and not a reused pid)?"""
        for proc in psutil.process_iter(["cwd"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["cwd"] and Path(proc.info["cwd"]) == self.root:
                    return True
            except (ProcessLookupError, psutil.Error):
                continue
        return False

    def _settle_interrupted(self) -> None:
        for p in self.journal.pending(self.run.id):
            if p.get("pgid") and self._group_works_here(int(p["pgid"])):
                kill_group(
                    int(p["pgid"])
                )  # an orphan of the killed session must not write into the workspace
            row = self._row(p["number"], p.get("kind", "candidate"), started_at=p["started_at"])
            row.update(
                {
                    "commit_sha": p.get("commit"),
                    "parent_commit": p.get("parent"),
                    "patch": p.get("patch"),
                    "patch_format": p.get("patch_format"),
                    "description": p.get("description", ""),
                    "rationale": p.get("rationale", ""),
                    "proposer": p.get("proposer", ""),
                    "params_json": json.dumps(p.get("params", {})),
                    "decision": "crash",
                    "reason": INTERRUPTED,
                    "log_path": p.get("log_path"),
                    **_usage_columns(p.get("usage", {})),
                }
            )
            self.journal.record_experiment(row)
            self.view.message(f"experiment #{p['number']} was interrupted; recorded as crash")
        self._restore_state()

    # --- the loop --------------------------------------------------------------------------------------

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
        from nightlab.research.proposers import resolve_kind

        kind = (
            self._proposer.name
            if self._proposer is not None
            else resolve_kind(self.config, self.options.proposer)
        )
        llm = self.config.proposer.llm
        if (
            self.options.max_cost is not None
            and kind == "llm"
            and not (llm.input_price_per_mtok or llm.output_price_per_mtok)
        ):
            raise ConfigError(
                "--max-cost needs the model's prices to count what the run spends: set "
                "proposer.llm.input_price_per_mtok and proposer.llm.output_price_per_mtok (USD per million tokens) "
                "in nightlab.toml; with both at 0 the cap would never stop the run"
            )

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
            self._setup()
            self._baseline()
            while not (reason := self._stop_reason(started)):
                if reason := self._one_experiment():
                    break
            self.state.stop_reason = reason
            if self.config.experiment.heldout:
                self.score_heldout()
        except KeyboardInterrupt:
            self.state.stop_reason = "interrupted"
        finally:
            self.ws.reset_to(self.state.best_commit, self.preserved)
            self.view.finished(self.state)
            self.journal.close()
        return self.state

    def _stop_reason(self, started: float) -> str:
        opts, st = self.options, self.state
        if opts.max_experiments is not None and st.experiments >= opts.max_experiments:
            return f"reached --max-experiments {opts.max_experiments}"
        if opts.hours is not None and time.monotonic() - started >= opts.hours * 3600:
            return f"reached --hours {opts.hours}"
        if opts.max_cost is not None and st.cost_usd + st.max_cost_single > opts.max_cost:
            return (
                f"the next proposal could exceed --max-cost ${opts.max_cost:.2f} (spent ${st.cost_usd:.4f})"
            )
        return ""

    def _setup(self) -> None:
        command = self.config.experiment.setup
        if not command:
            return
        before = set(self.ws.untracked_entries())
        self.view.phase_started(0, "setup", "setup", SETUP_TIMEOUT_SECONDS)
        result = run_phase(
            command,
            phase="setup",
            cwd=self.root,
            log_path=self._log_path("setup"),
            timeout=SETUP_TIMEOUT_SECONDS,
            env=(env := self._env("setup", 0)),
            wrap=self.wrap_for("setup", env),
            on_line=self.view.output,
        )
        if not result.ok:
            raise LoopError(
                f"experiment.setup failed ({_failure_words(result)}); see {result.log_path}\n{result.tail()}"
            )
        # What setup creates inside the workspace (e.g. a data cache) survives the cleans of this session.
        self.preserved += sorted(set(self.ws.untracked_entries()) - before - set(self.preserved))

    def _baseline(self) -> None:
        want = self.config.decide.baseline_runs
        while True:
            rows = self.journal.experiments(self.run.id)
            ok = [r for r in rows if r["kind"] == "baseline" and r["decision"] == "keep"]
            if len(ok) >= want:
                break
            number = self.journal.next_number(self.run.id)
            commit = self.run.base_commit
            self._mark_pending(
                number,
                {
                    "kind": "baseline",
                    "commit": commit,
                    "description": "baseline",
                    "proposer": "baseline",
                    "log_path": str(self._log_path(number)),
                },
            )
            trial = self._trial(number, "baseline", commit, seed_offset=len(ok), limit=None)
            row = self._row(number, "baseline")
            row.update({"commit_sha": commit, "description": "baseline", "proposer": "baseline"})
            self._fill_trial(row, [trial])
            if trial.measurement is None:
                row.update({"decision": "crash", "reason": trial.reason})
            else:
                row.update({"decision": "keep", "reason": f"baseline run {len(ok) + 1} of {want}"})
            self.ws.reset_to(commit, self.preserved)
            self._record(row)
            self.journal.verify_chain()
            self._restore_state()
            self.view.experiment_finished(row, self.state)
            if trial.measurement is None:
                raise LoopError(
                    f"the baseline (unmodified code) failed: {trial.reason}; see {trial.phases[-1].log_path}. "
                    "Fix the workspace, commit, and start again"
                )

    def _context(self) -> ProposalContext:
        program = self.root / self.config.workspace.program
        history = [
            PastExperiment(
                number=r["number"],
                description=r["description"] or "",
                decision=r["decision"],
                metric=r["metric"],
                reason=r["reason"] or "",
                patch=r["diff"] or r["patch"] or "",
                params=json.loads(r["params_json"] or "{}"),
            )
            for r in self.journal.experiments(self.run.id)
            if r["kind"] == "candidate"
        ]
        return ProposalContext(
            program=program.read_text(encoding="utf-8") if program.is_file() else "",
            files=self.ws.read_editable(),
            metric_name=self.config.metric.name,
            goal=self.config.metric.goal,
            best_metric=self.state.best,
            noise=self.state.noise,
            history=history,
            last_invalid_reason=self.last_invalid,
        )

    def _propose(self) -> Proposal | str:
        """The next proposal, or why there is none. A proposer whose service is down (an LLM outage that
        outlasted the client's own retries) is tried again, waiting longer each time, for up to
        `proposer.outage_seconds`."""
        patience = self.config.proposer.outage_seconds
        deadline = time.monotonic() + patience
        wait, longest = OUTAGE_BACKOFF_SECONDS
        while True:
            try:
                proposal = self.proposer.propose(self._context())
            except ProposerUnavailable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    return (
                        f"the proposer stayed unavailable for {patience:g}s (proposer.outage_seconds): {exc}"
                    )
                self.view.message(
                    f"the proposer is unavailable ({exc}); trying again in {min(wait, left):.0f}s"
                )
                time.sleep(min(wait, left))
                wait = min(wait * 2, longest)
                continue
            return "the proposer has nothing more to try" if proposal is None else proposal

    def _one_experiment(self) -> str:
        """Run one proposal end to end; return why the run must stop, or "" to go on."""
        proposal = self._propose()
        if isinstance(proposal, str):
            return proposal
        number = self.journal.next_number(self.run.id)
        parent = self.state.best_commit
        pending = {
            "kind": "candidate",
            "parent": parent,
            "patch": proposal.patch,
            "patch_format": proposal.patch_format,
            "description": proposal.description,
            "rationale": proposal.rationale,
            "proposer": self.proposer.name,
            "params": proposal.params,
            "usage": vars(proposal.usage),
            "log_path": str(self._log_path(number)),
        }
        self._mark_pending(number, pending)
        row = self._row(number, "candidate")
        row.update(
            {
                "parent_commit": parent,
                "patch": proposal.patch,
                "patch_format": proposal.patch_format,
                "description": proposal.description,
                "rationale": proposal.rationale,
                "proposer": self.proposer.name,
                "params_json": json.dumps(proposal.params, sort_keys=True),
                **_usage_columns(vars(proposal.usage)),
            }
        )
        self._evaluate_candidate(number, proposal, pending, row)
        self.ws.reset_to(self.state.best_commit if row["decision"] == "keep" else parent, self.preserved)
        self._record(row)
        self.journal.verify_chain()  # before anything is read back: a forged row must not steer the run
        self.last_invalid = row["reason"] if row["decision"] == "invalid" else None
        self._restore_state()
        self.view.experiment_finished(row, self.state)
        self.proposer.feedback(proposal, Outcome(row["decision"], row["metric"], row["reason"] or ""))
        return ""

    def _evaluate_candidate(
        self, number: int, proposal: Proposal, pending: dict[str, Any], row: dict[str, Any]
    ) -> None:
        """Validate, commit, run (and confirm) a proposal, filling `row` with the outcome."""
        parent = pending["parent"]
        try:
            self.ws.check_harness(self.run.harness)
            files = apply_patch(
                self.root, proposal.patch, proposal.patch_format, self.config.workspace.editable
            )
            self.ws.write_files(files)
            self.ws.check_harness(self.run.harness)
            commit = self.ws.commit(f"nightlab #{number}: {proposal.description}", sorted(files))
        except (EditError, WorkspaceError) as exc:
            row.update({"decision": "invalid", "reason": str(exc)})
            return
        limit = self.state.train_limit
        row.update({"commit_sha": commit, "diff": self.ws.diff(parent, commit), "train_limit": limit})
        self._mark_pending(number, {**pending, "commit": commit})
        trials = [self._trial(number, proposal.description, commit, seed_offset=0, limit=limit)]
        judgement, noise = None, None
        while trials[-1].measurement is not None:
            judgement, noise = self._judge(trials)
            if judgement.verdict != "confirm":
                break
            n = len(trials)
            trials.append(
                self._trial(
                    number, proposal.description, commit, seed_offset=n, label=f"confirm {n}", limit=limit
                )
            )
        self._fill_trial(row, trials)
        failed = next((t for t in trials if t.failure), None)
        if failed is not None:
            row.update({"decision": failed.failure, "reason": failed.reason})
            return
        assert judgement is not None
        row.update(
            {
                "decision": judgement.verdict,
                "reason": judgement.reason,
                "margin": judgement.margin,
                "sigmas": judgement.sigmas,
                "probability": judgement.probability,
                "noise": noise,
            }
        )
        if judgement.verdict == "keep" and self.config.experiment.checks:
            checks = self._phase(number, proposal.description, "checks", self.config.experiment.checks, 0)
            row["timings_json"] = json.dumps(
                {**json.loads(row["timings_json"]), "checks": checks.wall_seconds}
            )
            if not checks.ok:
                row.update({"decision": "discard", "reason": f"checks failed ({_failure_words(checks)})"})
                return
        if row["decision"] == "keep":
            self.state.best_commit = commit

    def _judge(self, trials: list[Trial]) -> tuple[decide.Judgement, float]:
        """The decision and the noise floor it used: a re-run candidate's own spread joins the pool."""
        st = self.state
        assert st.best is not None
        values = [t.measurement.value for t in trials if t.measurement is not None]
        return decide.judge_runs(
            values, self.repeats, st.best, st.best_runs, self.config.metric.goal, self.config.decide
        )

    def _train_limit(self, rows: list[dict[str, Any]]) -> float:
        """How long a candidate's training phase may take: the baseline's slowest training phase (or the budget,
        if longer), plus `budget_tolerance` of the budget and `startup_allowance_seconds`."""
        exp = self.config.experiment
        walls = [
            json.loads(r["timings_json"] or "{}").get("train", 0.0)
            for r in rows
            if r["kind"] == "baseline" and r["decision"] == "keep"
        ]
        reference = max([exp.budget_seconds, *walls])
        return reference + exp.budget_tolerance * exp.budget_seconds + exp.startup_allowance_seconds

    # --- one execution of a commit ---------------------------------------------------------------------

    def _trial(
        self,
        number: int | str,
        description: str,
        commit: str,
        *,
        seed_offset: int,
        limit: float | None,
        label: str = "",
    ) -> Trial:
        """Train and evaluate `commit`; a training phase longer than `limit` seconds is an overrun."""
        self.ws.reset_to(commit, self.preserved)
        try:
            self.ws.check_harness(self.run.harness)
        except WorkspaceError as exc:
            raise LoopError(f"{exc}; something outside nightlab is changing the workspace") from exc
        exp = self.config.experiment
        suffix = f" ({label})" if label else ""
        train = self._phase(number, description, "train" + suffix, exp.command, seed_offset)
        phases = [train]
        if train.timed_out:
            return _timed_out("training", phases, exp.timeout_seconds)
        if tampered := self._tampering("training", phases):
            return tampered
        if train.exit_code != 0:
            return Trial("crash", _with_tail(f"command {_failure_words(train)}", train), None, phases)
        if limit is not None and train.wall_seconds > limit:
            return Trial(
                "overrun",
                f"training took {train.wall_seconds:.1f}s, over the limit {limit:.1f}s (the baseline's slowest "
                f"training or the budget {exp.budget_seconds:g}s, whichever is longer, + {exp.budget_tolerance:g} x "
                f"budget + {exp.startup_allowance_seconds:g}s startup allowance)",
                None,
                phases,
            )
        return self._measure(number, description, "evaluate" + suffix, exp.evaluate, seed_offset, phases)

    def _tampering(self, what: str, phases: list[PhaseResult]) -> Trial | None:
        """A phase that changed what it may not: a harness file, the committed code (what would be scored would
        differ from the journal's diff), or anything outside the scratch paths (which a later phase could read)."""
        try:
            self.ws.check_harness(self.run.harness)
        except WorkspaceError as exc:
            return Trial("invalid", f"the {what} phase tampered with the harness: {exc}", None, phases)
        if changed := self.ws.tracked_changes():
            return Trial(
                "invalid",
                f"the {what} phase changed the committed code ({', '.join(changed)}), so the code scored would not "
                "be the code the journal records",
                None,
                phases,
            )
        if strays := self.ws.strays(self.preserved):
            scratch = ", ".join(self.config.workspace.scratch) or "none"
            return Trial(
                "invalid",
                f"the {what} phase wrote {', '.join(strays)} outside the scratch paths ({scratch}); a harness that "
                "needs such a place declares it under workspace.scratch",
                None,
                phases,
            )
        return None

    def _measure(
        self,
        number: int | str,
        description: str,
        phase: str,
        command: str | None,
        seed_offset: int,
        phases: list[PhaseResult],
    ) -> Trial:
        key = secrets.token_hex(32) if self.config.metric.channel == "harness" else None
        evaluate_log = None
        if command:
            ev = self._phase(number, description, phase, command, seed_offset, key=key)
            phases.append(ev)
            if ev.timed_out:
                return _timed_out(phase, phases, self.config.experiment.timeout_seconds)
            if tampered := self._tampering(phase, phases):
                return tampered
            if not ev.ok:
                return Trial("crash", _with_tail(f"{phase} {_failure_words(ev)}", ev), None, phases)
            evaluate_log = ev.output
        try:
            m = measure(self.config.metric, train_log=phases[0].output, evaluate_log=evaluate_log, key=key)
        except MetricError as exc:
            return Trial("crash", f"no usable metric: {exc}", None, phases)
        return Trial(None, "", m, phases)

    def _phase(
        self,
        number: int | str,
        description: str,
        phase: str,
        command: str,
        seed_offset: int,
        *,
        key: str | None = None,
    ) -> PhaseResult:
        exp = self.config.experiment
        kind = phase.split(" ")[0]
        limit = exp.budget_seconds if kind == "train" else exp.timeout_seconds
        self.view.phase_started(number, description, phase, limit)
        env = self._env(kind, seed_offset, key)
        return run_phase(
            command,
            phase=phase,
            cwd=self.root,
            log_path=self._log_path(number),
            timeout=exp.timeout_seconds,
            env=env,
            wrap=self.wrap_for(kind, env),
            on_line=self.view.output,
            on_start=self._note_process,
        )

    def _env(self, phase: str, seed_offset: int, key: str | None = None) -> dict[str, str]:
        exp = self.config.experiment
        extra = {
            **exp.env,
            "NIGHTLAB_BUDGET_SECONDS": f"{exp.budget_seconds:g}",
            "NIGHTLAB_PHASE": phase,
            "NIGHTLAB_SEED_OFFSET": str(seed_offset),
        }
        if key is not None:
            extra["NIGHTLAB_METRIC_KEY"] = key
        return clean_env(extra)

    def _log_path(self, number: int | str) -> Path:
        name = f"{number:04d}" if isinstance(number, int) else number
        return self.root / STATE_DIR / "logs" / self.run.tag / f"{name}.log"

    def _row(self, number: int, kind: str, started_at: float | None = None) -> dict[str, Any]:
        return {
            "run_id": self.run.id,
            "number": number,
            "kind": kind,
            "noise": self.state.noise,
            "metric": None,
            "best_before": self.state.best,
            "sandboxed": int(self.state.sandboxed),
            "sandbox_reason": self.state.sandbox_reason,
            "log_path": str(self._log_path(number)),
            "started_at": started_at or time.time(),
        }

    def _fill_trial(self, row: dict[str, Any], trials: list[Trial]) -> None:
        values = [t.measurement.value for t in trials if t.measurement is not None]
        timings: dict[str, float] = {}
        for t in trials:
            for p in t.phases:
                timings[p.phase] = round(p.wall_seconds, 3)
        extra: dict[str, float] = {}
        for t in trials:
            if t.measurement is not None:
                extra.update(t.measurement.extra)
        phases = [p for t in trials for p in t.phases]
        row.update(
            {
                "metric": statistics.fmean(values) if values else None,
                "metric_runs_json": json.dumps(values),
                "extra_json": json.dumps(extra, sort_keys=True),
                "timings_json": json.dumps(timings),
                "exit_code": trials[0].exit_code,
                "peak_rss_mb": max((p.peak_rss_mb for p in phases), default=None),
            }
        )

    # --- held-out scoring ------------------------------------------------------------------------------

    def final_heldout(self) -> list[dict[str, Any]]:
        """Open an existing run and score it on the held-out split if not done yet (`report --final`)."""
        if self.journal.find_run(self.options.tag or "") is None:
            raise LoopError(f"no run {self.options.tag!r} in the journal")
        try:
            self.open()
            return self.score_heldout()
        finally:
            if (
                self.state.best_commit
            ):  # else open() failed before it knew the run: its error is the one to see
                self.ws.reset_to(self.state.best_commit, self.preserved)
            self.journal.close()

    def score_heldout(self) -> list[dict[str, Any]]:
        """Score the baseline and the best commit once each on the held-out split (train, validate, test).

        Both numbers come from the same fresh training, so validation vs test compares like with like; the
        baseline's pair tells whether the gain on validation carried over to test.
        """
        command = self.config.experiment.heldout
        if not command:
            raise LoopError("experiment.heldout is not set in nightlab.toml; nothing to score")
        done = {h["commit_sha"] for h in self.journal.heldout(self.run.id)}
        targets = [("baseline", self.run.base_commit), ("best", self.state.best_commit)]
        for label, commit in targets:
            if commit in done:
                continue
            done.add(commit)
            row = self._heldout_one(label, commit)
            self.journal.record_heldout(row)
            self.journal.verify_chain()
            self.view.message(f"held-out {label}: validation {row['validation']} test {row['test']}")
        self.ws.reset_to(self.state.best_commit, self.preserved)
        return self.journal.heldout(self.run.id)

    def _heldout_one(self, label: str, commit: str) -> dict[str, Any]:
        name, what = f"heldout-{label}", f"held-out scoring of the {label}"
        trial = self._trial(name, what, commit, seed_offset=0, label="heldout", limit=self.state.train_limit)
        test = trial
        if trial.measurement is not None:
            test = self._measure(name, what, "heldout", self.config.experiment.heldout, 0, list(trial.phases))
        return {
            "run_id": self.run.id,
            "commit_sha": commit,
            "label": label,
            "validation": trial.measurement.value if trial.measurement else None,
            "test": test.measurement.value if test.measurement else None,
            "extra_json": json.dumps({"reason": test.reason}),
            "log_path": str(self._log_path(name)),
            "sandboxed": int(self.state.sandboxed),
            "sandbox_reason": self.state.sandbox_reason,
        }


def _usage_columns(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "cost_usd": usage.get("cost_usd", 0.0),
    }


def _timed_out(phase: str, phases: list[PhaseResult], timeout: float) -> Trial:
    return Trial("timeout", f"{phase} killed after {timeout:g}s (experiment.timeout_seconds)", None, phases)


def _with_tail(words: str, result: PhaseResult) -> str:
    tail = result.tail(3)
    return f"{words}: {tail}" if tail else words


def _failure_words(result: PhaseResult) -> str:
    if result.timed_out:
        return f"timed out after {result.wall_seconds:.0f}s"
    return f"exited with code {result.exit_code}"
