"""One execution of a commit: its phases, their environment, the tampering checks and the measurement.

An `Executor` runs the phases of one run's experiments in its workspace: setup once per session, then for
each trial of a commit its training phase and its evaluation (the `experiment.command` and
`experiment.evaluate` of nightlab.toml), and the checks of a change about to be kept; each phase in a clean
environment and, where on, the bubblewrap sandbox.

The harness is checked against the hashes taken when the run started before every training phase. After
training and after each evaluation the harness, the committed code and the workspace outside the scratch
paths must be as they were, so a phase that changed any of them (a harness file, possible only without the
sandbox; train.py rewriting itself; a file planted for a later phase) never gets its change scored: the trial
is `invalid`. A training phase longer than the limit it is given (`state.train_limit`) is an `overrun`, and
so is an evaluation longer than its own (`state.evaluate_limit`): the evaluator runs the model's code, which
must not do there the work the training budget refused it. What the loop decides from the trials is not
decided here.
"""

from __future__ import annotations

import os
import secrets
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from nightlab.config import ConfigError, NightlabConfig
from nightlab.errors import NightlabError
from nightlab.hardware import accelerator
from nightlab.research.journal import STATE_DIR, Experiment, Run
from nightlab.research.live import Observer
from nightlab.research.metrics import Measurement, MetricError, measure
from nightlab.research.progress import AbortRule, ProgressWatch
from nightlab.research.runner import PhaseResult, Wrap, clean_env, kill_group, run_phase
from nightlab.research.workspace import Workspace, WorkspaceError

# Given a phase kind and its complete environment, the argv wrapper to run it with (a sandbox), or None.
WrapFactory = Callable[[str, dict[str, str]], Wrap | None]

SETUP_TIMEOUT_SECONDS = 3600.0


class ExecutionError(NightlabError, RuntimeError):
    """An experiment cannot run as the run requires: setup failed, or the workspace changed under nightlab."""


@dataclass
class Trial:
    """One execution of a commit: its phases, and either a measurement or why there is none."""

    failure: str | None  # None, or a decision: crash | timeout | overrun | invalid
    reason: str
    measurement: Measurement | None
    phases: list[PhaseResult]
    remeasures_best: bool = False  # a run of the best beside a candidate's re-run, not of the candidate
    curve: list[list[float]] = field(default_factory=list)  # the training's progress (see progress.py)

    @property
    def exit_code(self) -> int | None:
        return self.phases[0].exit_code if self.phases else None


def apply_budget(config: NightlabConfig, override: float | None) -> None:
    """Set this session's training budget in `config`: `--budget` when given, else `gpu_budget_seconds` where
    an accelerator is, else `budget_seconds` as written."""
    exp = config.experiment
    if override is None:
        if exp.gpu_budget_seconds is not None and accelerator():
            exp.budget_seconds = exp.gpu_budget_seconds
        return
    if override <= 0:
        raise ConfigError(f"--budget must be positive, got {override}")
    if override > exp.timeout_seconds:
        raise ConfigError(
            f"--budget {override} exceeds experiment.timeout_seconds ({exp.timeout_seconds}); "
            "raise the timeout"
        )
    exp.budget_seconds = override


def unsandboxed(phase: str, env: dict[str, str]) -> None:
    """The wrap factory of a run without the sandbox: every phase runs as it is."""
    return None


def sandbox_wrap(ws: Workspace) -> tuple[bool, str, WrapFactory]:
    """Whether the bubblewrap jail is on per `[sandbox] mode`, why, and the wrap factory that jails each
    phase; "required" without a working bwrap raises here, before anything is created."""
    from nightlab.research import sandbox

    on, reason = sandbox.resolve_mode(ws.config.sandbox.mode)
    if not on:
        return False, reason, unsandboxed

    def wrap_for(phase: str, env: dict[str, str]) -> Wrap:
        files = [ws.root / rel for rel in ws.editable_files()]
        return sandbox.spec_for_phase(ws.config, ws.root, phase, files, env).wrap  # type: ignore[arg-type]

    return True, reason, wrap_for


class Executor:
    """Runs the phases of one run's experiments; `preserved` names what survives every reset of the
    workspace (what was there before the run, and what setup made)."""

    def __init__(
        self,
        ws: Workspace,
        run: Run,
        view: Observer,
        wrap_for: WrapFactory,
        *,
        on_start: Callable[[int], None] | None = None,
        log_root: Path | None = None,
    ):
        self.root, self.config, self.ws, self.run = ws.root, ws.config, ws, run
        self.log_root = log_root or ws.root  # a worker's copy of the workspace logs into the run's own
        self.view, self.wrap_for, self.on_start = view, wrap_for, on_start
        self.preserved = list(run.preserved)
        # Drawn afresh for every execution of a commit and given to all its phases, so that an evaluate step
        # can tell the output of this execution's training from anything an earlier experiment left behind.
        self.nonce = ""

    def checkout(self, commit: str) -> None:
        """Return the workspace exactly to `commit` (see `Workspace.reset_to`)."""
        self.ws.reset_to(commit, self.preserved)

    def log_path(self, number: int | str) -> Path:
        name = f"{number:04d}" if isinstance(number, int) else number
        return self.log_root / STATE_DIR / "logs" / self.run.tag / f"{name}.log"

    def setup(self) -> None:
        """Run `experiment.setup` once per session; what it creates in the workspace (e.g. a data cache)
        survives the resets of this session."""
        command = self.config.experiment.setup
        if not command:
            return
        before = set(self.ws.untracked_entries())
        self.view.phase_started(0, "setup", "setup", SETUP_TIMEOUT_SECONDS)
        env = self._env("setup", 0)
        result = run_phase(
            command,
            phase="setup",
            cwd=self.root,
            log_path=self.log_path("setup"),
            timeout=SETUP_TIMEOUT_SECONDS,
            env=env,
            wrap=self.wrap_for("setup", env),
            on_line=self.view.output,
        )
        if not result.ok:
            raise ExecutionError(
                f"experiment.setup failed ({failure_words(result)}); see {result.log_path}\n{result.tail()}"
            )
        self.preserved += sorted(set(self.ws.untracked_entries()) - before - set(self.preserved))

    def trial(
        self,
        number: int | str,
        description: str,
        commit: str,
        *,
        seed_offset: int,
        limit: float | None,
        evaluate_limit: float | None = None,
        label: str = "",
        abort: AbortRule | None = None,
    ) -> Trial:
        """Train and evaluate `commit`; a training phase longer than `limit` seconds, or an evaluation longer
        than `evaluate_limit`, is an overrun; one whose progress `abort` finds hopeless is stopped. The
        trial carries the training's progress curve when `metric.progress` names one."""
        self.checkout(commit)
        try:
            self.ws.check_harness(self.run.harness)
        except WorkspaceError as exc:
            raise ExecutionError(f"{exc}; something outside nightlab is changing the workspace") from exc
        exp, progress = self.config.experiment, self.config.metric.progress
        watch = ProgressWatch(progress, exp.budget_seconds, abort) if progress else None
        suffix = f" ({label})" if label else ""
        self.nonce = secrets.token_hex(16)
        train = self.phase(number, description, "train" + suffix, exp.command, seed_offset, watch=watch)
        result = self._after_training(number, description, suffix, seed_offset, train, limit, evaluate_limit)
        return replace(result, curve=watch.curve) if watch else result

    def _after_training(
        self,
        number: int | str,
        description: str,
        suffix: str,
        seed_offset: int,
        train: PhaseResult,
        limit: float | None,
        evaluate_limit: float | None,
    ) -> Trial:
        exp = self.config.experiment
        phases = [train]
        if train.timed_out:
            return _timed_out("training", phases, exp.timeout_seconds)
        if tampered := self._tampering("training", phases):
            return tampered
        if train.stopped:
            return Trial("aborted", train.stopped, None, phases)
        if train.exit_code != 0:
            return Trial("crash", _with_tail(f"command {failure_words(train)}", train), None, phases)
        if limit is not None and train.wall_seconds > limit:
            return Trial(
                "overrun",
                f"training took {train.wall_seconds:.1f}s, over the limit {limit:.1f}s (the baseline's "
                f"slowest training or the budget {exp.budget_seconds:g}s, whichever is longer, + "
                f"{exp.budget_tolerance:g} x budget + {exp.startup_allowance_seconds:g}s startup allowance)",
                None,
                phases,
            )
        evaluate = "evaluate" + suffix
        return self.measure(number, description, evaluate, exp.evaluate, seed_offset, phases, evaluate_limit)

    def measure(
        self,
        number: int | str,
        description: str,
        phase: str,
        command: str | None,
        seed_offset: int,
        phases: list[PhaseResult],
        limit: float | None = None,
    ) -> Trial:
        """Run the evaluation `command` (if any) after `phases` and read the metric; with the harness
        channel, the evaluation alone gets a fresh key to sign its metric line with. An evaluation longer than
        `limit` seconds is an overrun."""
        key = secrets.token_hex(32) if self.config.metric.channel == "harness" else None
        evaluate_log = None
        if command:
            ev = self.phase(number, description, phase, command, seed_offset, key=key)
            phases.append(ev)
            if ev.timed_out:
                return _timed_out(phase, phases, self.config.experiment.timeout_seconds)
            if tampered := self._tampering(phase, phases):
                return tampered
            if not ev.ok:
                return Trial("crash", _with_tail(f"{phase} {failure_words(ev)}", ev), None, phases)
            if limit is not None and ev.wall_seconds > limit:
                return Trial("overrun", self._evaluate_overrun(phase, ev.wall_seconds, limit), None, phases)
            evaluate_log = ev.output
        try:
            m = measure(self.config.metric, train_log=phases[0].output, evaluate_log=evaluate_log, key=key)
        except MetricError as exc:
            return Trial("crash", f"no usable metric: {exc}", None, phases)
        return Trial(None, "", m, phases)

    def _evaluate_overrun(self, phase: str, seconds: float, limit: float) -> str:
        exp = self.config.experiment
        return (
            f"the {phase} phase took {seconds:.1f}s, over its limit {limit:.1f}s (the baseline's slowest "
            f"evaluation + {exp.evaluate_tolerance:g} x it + {exp.startup_allowance_seconds:g}s startup "
            "allowance): work done while being scored is outside the budget"
        )

    def phase(
        self,
        number: int | str,
        description: str,
        phase: str,
        command: str,
        seed_offset: int,
        *,
        key: str | None = None,
        watch: ProgressWatch | None = None,
    ) -> PhaseResult:
        """Run one phase of an experiment, logged to the experiment's log file and shown to the view (and to
        `watch`, which may stop it)."""
        exp = self.config.experiment
        kind = phase.split(" ")[0]
        limit = exp.budget_seconds if kind == "train" else exp.timeout_seconds
        self.view.phase_started(number, description, phase, limit)
        env = self._env(kind, seed_offset, key)
        return run_phase(
            command,
            phase=phase,
            cwd=self.root,
            log_path=self.log_path(number),
            timeout=exp.timeout_seconds,
            env=env,
            wrap=self.wrap_for(kind, env),
            on_line=self.view.output if watch is None else _both(self.view.output, watch.feed),
            on_start=self.on_start,
            stop=None if watch is None else lambda: watch.stop_reason,
        )

    def checks(self, kept: Experiment) -> Experiment:
        """Run `experiment.checks` (e.g. the tests) on a change about to be kept: if they fail, it is
        discarded whatever it gained."""
        command = self.config.experiment.checks
        if not command:
            return kept
        checks = self.phase(kept.number, kept.description, "checks", command, 0)
        kept = replace(kept, timings={**kept.timings, "checks": checks.wall_seconds})
        if checks.ok:
            return kept
        return replace(kept, decision="discard", reason=f"checks failed ({failure_words(checks)})")

    def _tampering(self, what: str, phases: list[PhaseResult]) -> Trial | None:
        """A phase that changed what it may not: a harness file, the committed code (what would be scored
        would differ from the journal's diff), or anything outside the scratch paths (which a later phase
        could read)."""
        try:
            self.ws.check_harness(self.run.harness)
        except WorkspaceError as exc:
            return Trial("invalid", f"the {what} phase tampered with the harness: {exc}", None, phases)
        if changed := self.ws.tracked_changes():
            return Trial(
                "invalid",
                f"the {what} phase changed the committed code ({', '.join(changed)}), so the code scored "
                "would not be the code the journal records",
                None,
                phases,
            )
        if strays := self.ws.strays(self.preserved):
            scratch = ", ".join(self.config.workspace.scratch) or "none"
            return Trial(
                "invalid",
                f"the {what} phase wrote {', '.join(strays)} outside the scratch paths ({scratch}); a "
                "harness that needs such a place declares it under workspace.scratch",
                None,
                phases,
            )
        return None

    def _env(self, phase: str, seed_offset: int, key: str | None = None) -> dict[str, str]:
        exp = self.config.experiment
        extra = {
            **exp.env,
            "NIGHTLAB_BUDGET_SECONDS": f"{exp.budget_seconds:g}",
            "NIGHTLAB_PHASE": phase,
            "NIGHTLAB_SEED_OFFSET": str(seed_offset),
        }
        if self.nonce and phase != "setup":
            extra["NIGHTLAB_NONCE"] = self.nonce
        if key is not None:
            extra["NIGHTLAB_METRIC_KEY"] = key
        return clean_env(extra)


def _both(first: Callable[[str], None], second: Callable[[str], None]) -> Callable[[str], None]:
    def feed(line: str) -> None:
        first(line)
        second(line)

    return feed


def with_trials(experiment: Experiment, trials: list[Trial]) -> Experiment:
    """`experiment` with what its trials (in the order they ran) measured: the mean metric and each run, the
    best's runs beside them, the harness's extra numbers, the wall time of every phase, the first exit code,
    the peak memory and the first run's progress curve."""
    values = measured(t for t in trials if not t.remeasures_best)
    phases = [p for t in trials for p in t.phases]
    extra: dict[str, float] = {}
    for t in trials:
        if t.measurement is not None and not t.remeasures_best:
            extra.update(t.measurement.extra)
    return replace(
        experiment,
        metric=statistics.fmean(values) if values else None,
        metric_runs=values,
        best_reruns=measured(t for t in trials if t.remeasures_best),
        extra=extra,
        timings={p.phase: round(p.wall_seconds, 3) for p in phases},
        exit_code=trials[0].exit_code,
        peak_rss_mb=max((p.peak_rss_mb for p in phases), default=None),
        curve=trials[0].curve,
    )


def measured(trials: Iterable[Trial]) -> list[float]:
    """The metric of each trial that has one."""
    return [t.measurement.value for t in trials if t.measurement is not None]


def stop_orphan(pgid: int, root: Path) -> None:
    """Kill a process group a killed nightlab left running, if it still works in this workspace (and is not
    a reused id): an orphan must not write into the workspace the resumed run is using."""
    if _group_works_in(pgid, root):
        kill_group(pgid)


def _group_works_in(pgid: int, root: Path) -> bool:
    for proc in psutil.process_iter(["cwd"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["cwd"] and Path(proc.info["cwd"]) == root:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def failure_words(result: PhaseResult) -> str:
    if result.timed_out:
        return f"timed out after {result.wall_seconds:.0f}s"
    return f"exited with code {result.exit_code}"


def _timed_out(phase: str, phases: list[PhaseResult], timeout: float) -> Trial:
    return Trial("timeout", f"{phase} killed after {timeout:g}s (experiment.timeout_seconds)", None, phases)


def _with_tail(words: str, result: PhaseResult) -> str:
    tail = result.tail(3)
    return f"{words}: {tail}" if tail else words
