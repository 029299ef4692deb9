"""What each page shows, read from the journal: the run list, one run, one experiment.

The journal stays the source of truth and is opened per request (SQLite in WAL mode lets a page read while
the loop writes). Everything the agent wrote (descriptions, reasons, diffs, logs) goes to the page as text,
made terminal-safe here and HTML-escaped by the page templates.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nightlab.config import NightlabConfig
from nightlab.research.journal import Experiment, Journal, Run
from nightlab.research.report import find_run
from nightlab.research.safe_text import terminal_safe
from nightlab.research.state import LoopState, from_journal
from nightlab.web.svg import progress_svg

LOG_TAIL_BYTES = 64 * 1024  # the end of a log is where a crash says why


@contextmanager
def journal_of(root: Path) -> Iterator[Journal]:
    journal = Journal.for_workspace(root)
    try:
        journal.verify_chain()
        yield journal
    finally:
        journal.close()


def run_list(root: Path) -> list[dict[str, Any]]:
    with journal_of(root) as journal:
        return [
            {"tag": r.tag, "branch": r.branch, "metric": r.metric_name, "goal": r.goal}
            for r in reversed(journal.runs())
        ]


def _state(run: Run, records: list[Experiment]) -> tuple[NightlabConfig, LoopState]:
    config = NightlabConfig.model_validate(run.config)
    state = from_journal(
        LoopState(metric_name=run.metric_name, goal=run.goal), records, run.base_commit, config.experiment
    )
    return config, state


def status(root: Path, tag: str | None) -> dict[str, Any]:
    """The run's live status: the experiments running now (several with `--workers`), each with how far into
    its budget it is."""
    with journal_of(root) as journal:
        run = find_run(journal, tag)
        config = NightlabConfig.model_validate(run.config)
        pending = journal.pending(run.id)
        count = len(journal.experiments(run.id))
    running = []
    for marker in pending:
        e = marker.experiment
        elapsed = time.time() - e.started_at if e.started_at else None
        running.append(
            {
                "number": e.number,
                "description": terminal_safe(e.description or e.kind),
                "elapsed_seconds": None if elapsed is None else round(elapsed, 1),
                "budget_seconds": config.experiment.budget_seconds,
            }
        )
    return {"tag": run.tag, "running": running, "recorded": count}


def run_page(root: Path, tag: str | None) -> dict[str, Any]:
    with journal_of(root) as journal:
        run = find_run(journal, tag)
        records = journal.experiments(run.id)
        live = status(root, run.tag)
    config, state = _state(run, records)
    rows = [
        {
            "number": r.number,
            "kind": r.kind,
            "decision": r.decision,
            "metric": r.metric,
            "sigmas": r.sigmas,
            "seconds": sum(r.timings.values()),
            "description": "baseline" if r.kind == "baseline" else terminal_safe(r.description),
            "reason": terminal_safe(r.reason),
        }
        for r in records
    ]
    return {
        "run": run,
        "workspace": config.workspace.name,
        "state": state,
        "rows": rows,
        "plot": progress_svg(records, run.tag, state.noise),
        "live": live,
    }


def _log_tail(path: str | None) -> str:
    if not path or not Path(path).is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, Path(path).stat().st_size - LOG_TAIL_BYTES))
        return terminal_safe(f.read().decode("utf-8", "replace"))


def experiment_page(root: Path, tag: str, number: int) -> dict[str, Any] | None:
    with journal_of(root) as journal:
        run = find_run(journal, tag)
        record = next((r for r in journal.experiments(run.id) if r.number == number), None)
    if record is None:
        return None
    diff = terminal_safe(record.diff or record.patch or "")
    return {
        "run": run,
        "e": record,
        "description": "baseline" if record.kind == "baseline" else terminal_safe(record.description),
        "reason": terminal_safe(record.reason),
        "rationale": terminal_safe(record.rationale),
        "diff_lines": [(_line_class(line), line) for line in diff.splitlines()],
        "log": _log_tail(record.log_path),
    }


def _line_class(line: str) -> str:
    if line.startswith(("+++", "---")):
        return "file"
    return {"+": "add", "-": "del", "@": "hunk"}.get(line[:1], "")
