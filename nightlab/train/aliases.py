"""Served aliases: a stable `/v1` model name (`assistant-latest`) that points at a checkpoint and can move.

The online loop promotes a new checkpoint by moving its alias; clients keep asking for the alias and get the
new weights from their next request on. Every move is a row appended to the alias's history in one SQLite
transaction, so a switch is atomic (a request sees the old target or the new, never a mix) and nothing is
forgotten: a rollback is a move back to the target before the current one, itself recorded, with its reason,
and rollbacks in a row walk further back (C -> B -> A), as undoing the promotions one by one.
An alias belongs to the API key that set it, like checkpoints do.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nightlab.train.checkpoints import open_db
from nightlab.train.errors import UserError

DB_NAME = "aliases.db"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS alias_moves (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, name TEXT NOT NULL, model TEXT NOT NULL,
    kind TEXT NOT NULL, reason TEXT NOT NULL, moved_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS alias_moves_by_name ON alias_moves (owner, name, seq);
"""


@dataclass(frozen=True)
class AliasMove:
    """One point in an alias's history: where it pointed from `moved_at` on, and why."""

    name: str
    model: str
    kind: str  # set | rollback
    reason: str
    moved_at: float


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UserError(
            f"alias {name!r} is not a valid name: 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


class AliasStore:
    """Every alias's history, per owner; the current target is the latest move."""

    def __init__(self, data_dir: Path) -> None:
        self.db = open_db(Path(data_dir) / DB_NAME)
        self.db.executescript(_SCHEMA)
        self.lock = threading.Lock()

    def current(self, owner: str, name: str) -> AliasMove | None:
        history = self.history(owner, name, limit=1)
        return history[0] if history else None

    def history(self, owner: str, name: str, limit: int = 100) -> list[AliasMove]:
        """The alias's moves, the latest first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT * FROM alias_moves WHERE owner=? AND name=? ORDER BY seq DESC LIMIT ?",
                (owner, name, limit),
            ).fetchall()
        return [AliasMove(r["name"], r["model"], r["kind"], r["reason"], r["moved_at"]) for r in rows]

    def names(self, owner: str) -> list[AliasMove]:
        """Each of the owner's aliases as it points now, by name."""
        with self.lock:
            rows = self.db.execute(
                "SELECT m.* FROM alias_moves m JOIN (SELECT name, MAX(seq) AS seq FROM alias_moves "
                "WHERE owner=? GROUP BY name) latest ON m.seq = latest.seq ORDER BY m.name",
                (owner,),
            ).fetchall()
        return [AliasMove(r["name"], r["model"], r["kind"], r["reason"], r["moved_at"]) for r in rows]

    def move(self, owner: str, name: str, model: str, reason: str) -> AliasMove:
        """Point `name` at `model` (already checked to be servable to `owner`)."""
        check_name(name)
        with self.lock:
            return self._append(owner, AliasMove(name, model, "set", reason or "set", time.time()))

    def rollback(self, owner: str, name: str, reason: str = "") -> AliasMove:
        """Undo the alias's latest promotion still standing: back to the target it had before (404 for an
        unknown alias, 409 when there is nothing left to undo)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT model, kind FROM alias_moves WHERE owner=? AND name=? ORDER BY seq", (owner, name)
            ).fetchall()
            if not rows:
                raise UserError(f"no alias {name!r}; set one with PUT /v1/aliases/{name}", 404)
            standing: list[str] = []  # the promotions not undone yet, oldest first
            for row in rows:
                if row["kind"] == "rollback":
                    standing.pop()
                else:
                    standing.append(row["model"])
            if len(standing) < 2:
                raise UserError(
                    f"alias {name!r} has no earlier target to roll back to (it is {standing[-1]})", 409
                )
            why = f"rollback from {standing[-1]}" + (f": {reason}" if reason else "")
            return self._append(owner, AliasMove(name, standing[-2], "rollback", why, time.time()))

    def _append(self, owner: str, move: AliasMove) -> AliasMove:
        """Record a move (the caller holds the lock): one INSERT, so the switch is atomic."""
        self.db.execute(
            "INSERT INTO alias_moves (owner, name, model, kind, reason, moved_at) VALUES (?, ?, ?, ?, ?, ?)",
            (owner, move.name, move.model, move.kind, move.reason[:500], move.moved_at),
        )
        return move

    def close(self) -> None:
        with self.lock:
            self.db.close()
