"""Feedback on served answers, the first step of the online loop: what users thought of what `/v1` said.

Every `/v1` answer is remembered under its response id and choice index, with the prompt it answered, the
model and the API key's owner, so a rating sent later (`POST /v1/feedback`) is stored beside what it rates.
A rating is +1/-1 or any score; a correction (the answer the user wanted) and a free-text comment are
optional. Feedback is one row per answer: sending it again for the same answer replaces it (a user who
changes their mind is not counted twice). Only the key that got an answer may rate it. `export` gives the
rows as a dataset (JSON lines: prompt, answer, rating, correction, comment), and corrections as preference
pairs (prompt, chosen, rejected).

Stored in SQLite (`feedback.db` in the service's data dir), committed before the request is answered.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nightlab.train.checkpoints import open_db
from nightlab.train.errors import UserError

DB_NAME = "feedback.db"
ANSWER_ID = r"^(chatcmpl|cmpl)-[0-9a-f]{32}$"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    answer_id TEXT NOT NULL, choice INTEGER NOT NULL, owner TEXT NOT NULL, model TEXT NOT NULL,
    prompt TEXT NOT NULL, answer TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (answer_id, choice));
CREATE TABLE IF NOT EXISTS feedback (
    answer_id TEXT NOT NULL, choice INTEGER NOT NULL, owner TEXT NOT NULL, rating REAL NOT NULL,
    correction TEXT, comment TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (answer_id, choice));
"""


class FeedbackBody(BaseModel):
    """`POST /v1/feedback`: which answer (the response's `id`, and `choice` for n > 1), and what of it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ANSWER_ID)
    choice: int = Field(0, ge=0, le=1024)
    rating: float = Field(ge=-1e6, le=1e6)  # +1 / -1, or a score on the user's own scale
    correction: str | None = Field(None, max_length=100_000)  # the answer that was wanted
    comment: str | None = Field(None, max_length=10_000)

    @field_validator("rating")
    @classmethod
    def _finite(cls, rating: float) -> float:
        if not math.isfinite(rating):
            raise ValueError("must be a finite number")
        return rating


class FeedbackStore:
    """The answers served and the feedback on them, in one SQLite file."""

    def __init__(self, data_dir: Path) -> None:
        self.db = open_db(Path(data_dir) / DB_NAME)
        self.db.executescript(_SCHEMA)
        self.lock = threading.Lock()

    def remember(self, answer_id: str, owner: str, model: str, answers: list[tuple[int, Any, str]]) -> None:
        """Keep one response's answers: (choice index, the prompt it answered, its text) each."""
        now = time.time()
        rows = [
            (answer_id, index, owner, model, json.dumps(prompt), text, now) for index, prompt, text in answers
        ]
        with self.lock:
            self.db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def record(self, owner: str, body: FeedbackBody) -> bool:
        """Store `body` for its answer; True when it replaced earlier feedback on the same answer. An answer
        this server never gave to `owner` is a 404 (whether it exists for another key is not told)."""
        now = time.time()
        with self.lock:
            known = self.db.execute(
                "SELECT 1 FROM answers WHERE answer_id=? AND choice=? AND owner=?",
                (body.id, body.choice, owner),
            ).fetchone()
            if known is None:
                raise UserError(
                    f"no answer {body.id} (choice {body.choice}) was served to this API key; rate an answer "
                    "by the `id` its response carried",
                    status=404,
                )
            earlier = self.db.execute(
                "SELECT created_at FROM feedback WHERE answer_id=? AND choice=?", (body.id, body.choice)
            ).fetchone()
            created = earlier["created_at"] if earlier else now
            self.db.execute(
                "INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (body.id, body.choice, owner, body.rating, body.correction, body.comment, created, now),
            )
        return earlier is not None

    def rows(self, owner: str | None = None, since: float = 0.0) -> Iterator[dict[str, Any]]:
        """Every rated answer (of `owner`, or everyone's) rated or re-rated after `since`, oldest feedback
        first: one dataset row each."""
        where, args = ("WHERE f.updated_at > ?", [since])
        if owner is not None:
            where, args = where + " AND f.owner=?", [since, owner]
        with self.lock:
            found = self.db.execute(
                "SELECT a.*, f.rating, f.correction, f.comment, f.created_at AS rated_at, f.updated_at "
                "FROM feedback f JOIN answers a ON a.answer_id=f.answer_id AND a.choice=f.choice "
                f"{where} ORDER BY f.created_at, f.answer_id, f.choice",
                args,
            ).fetchall()
        for row in found:
            yield {
                "id": row["answer_id"],
                "choice": row["choice"],
                "owner": row["owner"],
                "model": row["model"],
                "prompt": json.loads(row["prompt"]),
                "answer": row["answer"],
                "rating": row["rating"],
                "correction": row["correction"],
                "comment": row["comment"],
                "rated_at": row["rated_at"],
                "updated_at": row["updated_at"],
            }

    def export(self, out: Path, owner: str | None = None) -> tuple[int, int]:
        """Write `out` (every rated answer) and `out`'s `.pairs.jsonl` sibling (a preference pair per
        correction: the correction chosen over the answer); how many rows each got."""
        pairs_path = out.with_name(out.stem + ".pairs.jsonl")
        rated = paired = 0
        with out.open("w", encoding="utf-8") as rows_file, pairs_path.open("w", encoding="utf-8") as pairs:
            for row in self.rows(owner):
                rows_file.write(json.dumps(row) + "\n")
                rated += 1
                if row["correction"] and row["correction"] != row["answer"]:
                    pair = {"prompt": row["prompt"], "chosen": row["correction"], "rejected": row["answer"]}
                    pairs.write(json.dumps(pair | {"model": row["model"], "id": row["id"]}) + "\n")
                    paired += 1
        return rated, paired

    def close(self) -> None:
        with self.lock:
            self.db.close()
