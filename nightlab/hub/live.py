"""Live run status on the hub: each run's heartbeat says what it is running now, so the hub's pages show
every machine's night as it goes, not only what it has finished.

A heartbeat replaces the run's last one (one row per workspace, machine and run tag). A run that stops
sending is not guessed about: the page says how long it has been silent.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from nightlab.hub import db

MAX_RUNNING = 64
SILENT_SECONDS = 900.0  # a heartbeat older than this is shown as silence, not as a running experiment


class RunningIn(BaseModel):
    number: int = Field(ge=0)
    description: str = Field(default="", max_length=2000)
    started_at: float = Field(ge=0)  # Unix time on the posting machine


class LiveIn(BaseModel):
    """A heartbeat: the run, and what it runs now (nothing, between experiments or once `finished`)."""

    tag: str = Field(min_length=1, max_length=200)
    budget_seconds: float = Field(gt=0)
    running: list[RunningIn] = Field(default_factory=list, max_length=MAX_RUNNING)
    finished: bool = False


class LiveOut(BaseModel):
    machine: str
    accelerator: str
    user: str
    tag: str
    budget_seconds: float
    running: list[RunningIn]
    finished: bool
    updated: datetime
    silent_seconds: float  # since the last heartbeat


def store(s: Session, user: db.User, workspace: str, machine: str, body: LiveIn) -> None:
    """Replace the run's heartbeat (the workspace and machine rows exist already)."""
    key = hashlib.sha256(f"{workspace}|{machine}|{body.tag}".encode()).hexdigest()
    s.merge(
        db.LiveRun(
            key=key,
            workspace=workspace,
            machine=machine,
            user=user.id,
            tag=body.tag,
            running=json.dumps([r.model_dump() for r in body.running]),
            budget_seconds=body.budget_seconds,
            finished=body.finished,
            updated=datetime.now(UTC),
        )
    )
    s.commit()


def live_runs(s: Session, workspace: str) -> list[LiveOut]:
    """The workspace's runs by their last heartbeat, the latest first."""
    now = datetime.now(UTC)
    found = []
    for row in s.scalars(select(db.LiveRun).where(db.LiveRun.workspace == workspace)):
        updated = row.updated if row.updated.tzinfo else row.updated.replace(tzinfo=UTC)  # SQLite drops it
        found.append(
            LiveOut(
                machine=row.machine,
                accelerator=s.get(db.Machine, row.machine).accelerator,
                user=s.get(db.User, row.user).name,
                tag=row.tag,
                budget_seconds=row.budget_seconds,
                running=[RunningIn(**r) for r in json.loads(row.running)],
                finished=row.finished,
                updated=updated,
                silent_seconds=(now - updated).total_seconds(),
            )
        )
    return sorted(found, key=lambda run: run.updated, reverse=True)
