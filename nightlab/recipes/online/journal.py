"""`online.jsonl`, the online loop's journal: one row per round, appended as the round ends. A light module,
so the dashboard and `nightlab online status` read it without loading the training clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nightlab.errors import NightlabError

JOURNAL = "online.jsonl"


class NoOnlineJournal(NightlabError, FileNotFoundError):
    """The directory holds no online run."""


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
