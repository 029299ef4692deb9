"""What a person watching `nightlab run` sees: a rich Live panel on a terminal, plain log lines otherwise.

`Observer` is everything the loop tells a view; the loop knows its views only through it. Descriptions,
reasons, messages and output lines come from code and proposals nobody reviewed, so the views print them
`terminal_safe`: an escape sequence in them must not write the clipboard or clear the screen.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from nightlab.research.journal import Experiment
from nightlab.research.safe_text import terminal_safe
from nightlab.research.state import LoopState

DECISION_STYLE = {
    "keep": "bold green",
    "discard": "yellow",
    "crash": "red",
    "timeout": "red",
    "invalid": "magenta",
    "overrun": "red",
    "quarantine": "bold magenta",
    "duplicate": "dim",
    "aborted": "yellow",
    "stale": "dim",
}


class Observer(Protocol):
    """What a view of the loop hears about: the run starting and stopping, each phase and its output lines,
    each recorded experiment, and messages."""

    def started(self, state: LoopState, resumed: bool) -> None: ...
    def phase_started(self, number: int | str, description: str, phase: str, limit: float) -> None: ...
    def output(self, line: str) -> None: ...
    def experiment_finished(self, experiment: Experiment, state: LoopState) -> None: ...
    def message(self, text: str) -> None: ...
    def finished(self, state: LoopState) -> None: ...


class SilentView(Observer):
    """Hears everything and shows nothing (the protocol's empty bodies), for runs without a view."""


class Chorus(Observer):
    """Several observers heard as one, in order: a view and the hub poster, say."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def started(self, state: LoopState, resumed: bool) -> None:
        for observer in self.observers:
            observer.started(state, resumed)

    def phase_started(self, number: int | str, description: str, phase: str, limit: float) -> None:
        for observer in self.observers:
            observer.phase_started(number, description, phase, limit)

    def output(self, line: str) -> None:
        for observer in self.observers:
            observer.output(line)

    def experiment_finished(self, experiment: Experiment, state: LoopState) -> None:
        for observer in self.observers:
            observer.experiment_finished(experiment, state)

    def message(self, text: str) -> None:
        for observer in self.observers:
            observer.message(text)

    def finished(self, state: LoopState) -> None:
        for observer in self.observers:
            observer.finished(state)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _describe(experiment: Experiment, state: LoopState) -> str:
    """One line for a recorded experiment; a keep whose first run was implausible says so."""
    e = experiment
    what = "baseline" if e.kind == "baseline" else e.description
    metric = f"{state.metric_name}={_fmt(e.metric)}"
    sigma = f" ({e.sigmas:+.1f} noise)" if e.sigmas is not None else ""
    reason = f": {e.reason}" if e.decision != "keep" and e.reason else ""
    if e.decision == "keep" and e.quarantine:
        reason = f" [implausible gain, kept after re-verification: {e.quarantine}]"
    return terminal_safe(f"#{e.number} {e.decision} {metric}{sigma} {what}{reason}")


def _sandbox_words(state: LoopState) -> str:
    return ("on" if state.sandboxed else "off") + (
        f" ({state.sandbox_reason})" if state.sandbox_reason else ""
    )


class PlainView:
    """One line per event, for logs and pipes (no cursor tricks)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(highlight=False, soft_wrap=True)

    def _say(self, text: str) -> None:
        self.console.print(f"[{time.strftime('%H:%M:%S')}] {terminal_safe(text)}", markup=False)

    def started(self, state: LoopState, resumed: bool) -> None:
        verb = "resuming" if resumed else "starting"
        self._say(
            f"{verb} run {state.tag} on branch {state.branch}; proposer {state.proposer}; "
            f"sandbox {_sandbox_words(state)}"
        )

    def phase_started(self, number: int | str, description: str, phase: str, limit: float) -> None:
        self._say(f"#{number} {phase}: {description}")

    def output(self, line: str) -> None:
        """The full output is in the experiment's log file; a plain view stays quiet."""

    def experiment_finished(self, experiment: Experiment, state: LoopState) -> None:
        self._say(_describe(experiment, state))
        if state.best is not None:
            self._say(
                f"best {state.metric_name}={_fmt(state.best)} noise={_fmt(state.noise)} "
                f"keeps {state.keeps}/{state.experiments}"
            )

    def message(self, text: str) -> None:
        self._say(text)

    def finished(self, state: LoopState) -> None:
        self._say(
            f"stopped: {state.stop_reason or 'error'}; {state.experiments} experiments, {state.keeps} kept, "
            f"best {state.metric_name}={_fmt(state.best)} (baseline {_fmt(state.baseline)})"
        )


class LiveView(PlainView):
    """A rich Live panel redrawn a few times a second; finished experiments scroll above it."""

    def __init__(self, console: Console | None = None):
        super().__init__(console)
        self._lock = threading.Lock()
        self._state = LoopState()
        self._phase = ("", "", "", 1.0, time.monotonic())  # number, description, phase, limit, started
        self._last_line = ""
        self._live = Live(self, console=self.console, refresh_per_second=4, transient=True)

    def __rich__(self) -> Group:
        with self._lock:
            st, (number, description, phase, limit, started), last = self._state, self._phase, self._last_line
        elapsed = time.monotonic() - started
        head = Text.assemble(
            (f"#{number} ", "bold"),
            (f"{phase} ", "cyan"),
            (description[:100], ""),
        )
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(limit, 1e-9), completed=min(elapsed, limit), width=40),
            Text(f"{elapsed:5.1f}s / {limit:g}s"),
        )
        stats = Table.grid(padding=(0, 3))
        stats.add_row(
            f"best {st.metric_name}: [bold]{_fmt(st.best)}[/] (baseline {_fmt(st.baseline)})",
            f"noise floor: {_fmt(st.noise)}",
        )
        stats.add_row(
            f"keeps: {st.keeps}/{st.experiments} ({st.keep_rate:.0%})",
            f"sandbox: {'on' if st.sandboxed else 'off'}   cost: ${st.cost_usd:.4f}",
        )
        parts = [head, bar, Text(last[-160:], style="dim"), stats]
        if not st.sandboxed:
            # An unsandboxed run stays visible as such for as long as it runs, not only in the first line.
            parts.append(Text(st.sandbox_reason or "unsandboxed", style="bold red"))
        if quarantined := st.decisions.get("quarantine"):
            words = f"{quarantined} result(s) quarantined as too good to be true: see their reasons"
            parts.append(Text(words, style=DECISION_STYLE["quarantine"]))
        return Group(*parts)

    def started(self, state: LoopState, resumed: bool) -> None:
        super().started(state, resumed)
        with self._lock:
            self._state = state
        self._live.start()

    def phase_started(self, number: int | str, description: str, phase: str, limit: float) -> None:
        with self._lock:
            self._phase = (str(number), terminal_safe(description), phase, limit, time.monotonic())
            self._last_line = ""

    def output(self, line: str) -> None:
        if line.startswith("NIGHTLAB_METRIC"):
            return  # the signed record is for the loop, not for the screen
        with self._lock:
            self._last_line = terminal_safe(line)

    def experiment_finished(self, experiment: Experiment, state: LoopState) -> None:
        style = DECISION_STYLE.get(experiment.decision, "")
        self.console.print(Text(_describe(experiment, state), style=style))
        with self._lock:
            self._state = state

    def message(self, text: str) -> None:
        self.console.print(Text(terminal_safe(text), style="dim"))

    def finished(self, state: LoopState) -> None:
        self._live.stop()
        super().finished(state)


def make_view(console: Console | None = None) -> PlainView:
    """The Live panel on a terminal, plain lines when stdout is a pipe or a file."""
    console = console or Console(soft_wrap=True)
    return LiveView(console) if console.is_terminal else PlainView(console)
