"""Lessons for the memory's groups, written by an LLM: the optional half of the memory's refill.

A group line ("12 changes to lr: 10 discard, 2 crash") counts what happened; a lesson says what to make of
it ("raising the LR past 3e-3 diverges every time; stay below"). Each lesson costs a request, so the cost
stays bounded: a lesson is cached by its group's key and size and asked again only when the group gains
members, at most `max_new` a render (the other groups keep their last lesson), and the cache is a JSON file
in the workspace's state dir, so a resumed run does not pay twice. `ask` is any `prompt -> answer` callable,
which keeps the memory free of LLM clients; a failing one costs the lessons, never the proposal.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from nightlab.research.journal import STATE_DIR
from nightlab.research.safe_text import terminal_safe

log = logging.getLogger(__name__)

Ask = Callable[[str], str]
NOTES_FILE = "memory_notes.json"
LESSON_CHARS = 200
MAX_NEW = 3
QUESTION = "Write the lesson of one group of experiments from an ML research run."
_ANSWER = (
    "Answer with one sentence of at most 30 words that the next experiments should heed (what keeps failing "
    "and why, the range to stay in, or what is left to try), and nothing else."
)


def clean(text: str) -> str:
    """A model's answer as one printable line of at most LESSON_CHARS characters: it goes into every brief."""
    return " ".join(terminal_safe(text).split())[:LESSON_CHARS].strip()


class LessonWriter:
    """Asks for the groups' lessons and remembers them, by group key, with the group's size when asked."""

    def __init__(self, ask: Ask, path: Path | None = None, max_new: int = MAX_NEW) -> None:
        self.ask, self.path, self.max_new = ask, path, max_new
        self.cache: dict[str, dict[str, int | str]] = _load(path)
        self.asked = 0  # lessons asked in the current render
        self.warned = False

    @classmethod
    def for_workspace(cls, ask: Ask, workspace: Path | None) -> LessonWriter:
        """Lessons kept in the workspace's `.nightlab/` (in memory only without a workspace)."""
        return cls(ask, workspace / STATE_DIR / NOTES_FILE if workspace is not None else None)

    def start(self) -> None:
        """A new render: up to `max_new` lessons may be asked again."""
        self.asked = 0

    def lesson(self, key: str, size: int, evidence: str) -> str:
        """The lesson of group `key` of `size` experiments ("" for none): the cached one for this size, else a
        new one while this render may ask, else the group's last one."""
        cached = self.cache.get(key)
        if cached is not None and cached["size"] == size:
            return str(cached["lesson"])
        if self.asked < self.max_new:
            self.asked += 1
            try:
                text = clean(self.ask(f"{QUESTION}\n\n{evidence}\n\n{_ANSWER}"))
            except Exception as exc:  # whatever the LLM's failure, it costs the lessons, not the proposal
                self.asked = self.max_new  # the endpoint is failing: no more asks in this render
                if not self.warned:
                    log.warning("memory notes: a lesson request failed, groups render without one: %s", exc)
                    self.warned = True
            else:
                self.cache[key] = {"size": size, "lesson": text}
                self._save()
                return text
        return str(cached["lesson"]) if cached is not None else ""

    def _save(self) -> None:
        """Write the cache whole or not at all (a temp file, then os.replace): a crash never tears it."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{NOTES_FILE}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(self.cache, file, indent=1, sort_keys=True)
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _load(path: Path | None) -> dict[str, dict[str, int | str]]:
    """The cached lessons; an unreadable or foreign file counts as none (they are only asked again)."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        key: {"size": entry["size"], "lesson": clean(entry["lesson"])}
        for key, entry in data.items()
        if isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("lesson"), str)
    }
