"""`online.jsonl`, the online loop's journal: one row per round, appended as the round ends. A light module,
so the dashboard and `nightlab online status` read it without loading the training clients.

The journal is also what a killed run resumes from: round 0 records what makes the rows one run (`run`: the
model, alias and seed), and every row records the policy's saved training state and the loop's cursors.
`continued_rounds` decides whether a run may start, or carry on, in a log directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nightlab.errors import NightlabError

JOURNAL = "online.jsonl"


class NoOnlineJournal(NightlabError, FileNotFoundError):
    """The directory holds no online run."""


class JournalRefused(NightlabError, ValueError):
    """The log directory's journal cannot take this run; the message says what to do instead."""


def append_round(log_dir: Path, row: dict[str, Any]) -> None:
    with (Path(log_dir) / JOURNAL).open("a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")


def read_rounds(log_dir: Path) -> list[dict[str, Any]]:
    path = Path(log_dir) / JOURNAL
    if not path.is_file():
        raise NoOnlineJournal(
            f"no {JOURNAL} in {log_dir}: `nightlab online run --log-dir {log_dir}` writes it"
        )
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def continued_rounds(log_dir: Path, run: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """The rows a run carries on from: none for a new run, the journal's for a resume. Refuses a new run over
    another's rounds (the two would mix), a resume with nothing to continue, and a resume whose `run` (model,
    alias, seed) differs from the journal's, naming the first key that does."""
    path = Path(log_dir) / JOURNAL
    rows = read_rounds(log_dir) if path.is_file() else []
    if not resume:
        if rows:
            raise JournalRefused(
                f"{path} already holds a run's rounds; pick a new log directory, or pass --resume to "
                "continue that run"
            )
        return rows
    if not rows:
        raise NoOnlineJournal(f"nothing to resume: no rounds in {path}; run without --resume to start a run")
    recorded = rows[0].get("run")
    if recorded is None or "state" not in rows[-1]:
        raise JournalRefused(f"{path} holds no saved training state to resume from; pick a new log directory")
    for key, value in run.items():
        if recorded.get(key) != value:
            raise JournalRefused(
                f"cannot resume {path}: its run has {key} {recorded.get(key)!r}, not {value!r}; pass "
                f"--{key.replace('_', '-')} {recorded.get(key)} to continue it, or pick a new log directory"
            )
    return rows
