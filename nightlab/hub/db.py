"""The hub's database: users with hashed tokens, machines, workspaces, results and kept-commit bundles.

SQLAlchemy 2.0, so the same models run on a SQLite file (the default) or a PostgreSQL URL.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    LargeBinary,
    String,
    Text,
    create_engine,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime] = mapped_column(default=_now)


class Machine(Base):
    __tablename__ = "machines"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    accelerator: Mapped[str] = mapped_column(String(200))
    memory_gb: Mapped[float] = mapped_column(Float)
    calibration: Mapped[float] = mapped_column(Float)


class Workspace(Base):
    __tablename__ = "workspaces"
    identity: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str] = mapped_column(String(200))
    goal: Mapped[str] = mapped_column(String(16))


class Result(Base):
    __tablename__ = "results"
    id: Mapped[int] = mapped_column(primary_key=True)
    workspace: Mapped[str] = mapped_column(ForeignKey("workspaces.identity"), index=True)
    machine: Mapped[str] = mapped_column(ForeignKey("machines.id"))
    user: Mapped[int] = mapped_column(ForeignKey("users.id"))
    commit: Mapped[str | None] = mapped_column(String(64), index=True)
    parent: Mapped[str | None] = mapped_column(String(64), index=True)
    description: Mapped[str] = mapped_column(String(2000))
    decision: Mapped[str] = mapped_column(String(32))
    metric: Mapped[float | None] = mapped_column(Float)
    sigmas: Mapped[float | None] = mapped_column(Float)
    noise: Mapped[float | None] = mapped_column(Float)
    posted: Mapped[datetime] = mapped_column(default=_now)


class LiveRun(Base):
    """A run's last heartbeat: what it is running now (a JSON list), replaced by each new one."""

    __tablename__ = "live_runs"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # workspace, machine and tag, hashed
    workspace: Mapped[str] = mapped_column(ForeignKey("workspaces.identity"), index=True)
    machine: Mapped[str] = mapped_column(ForeignKey("machines.id"))
    user: Mapped[int] = mapped_column(ForeignKey("users.id"))
    tag: Mapped[str] = mapped_column(String(200))
    running: Mapped[str] = mapped_column(Text)
    budget_seconds: Mapped[float] = mapped_column(Float)
    finished: Mapped[bool] = mapped_column(Boolean, default=False)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Bundle(Base):
    __tablename__ = "bundles"
    commit: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    user: Mapped[int] = mapped_column(ForeignKey("users.id"))


def hash_token(token: str) -> str:
    """Only the hash is stored, so a leaked database holds no usable token."""
    return hashlib.sha256(token.encode()).hexdigest()


def open_database(url: str) -> Engine:
    """An engine on `url` (a `sqlite:///path` file or a PostgreSQL URL) with every table created."""
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    return engine


def create_token(engine: Engine, name: str) -> str:
    """A new random token for user `name` (created if new; an existing user's old token stops working)."""
    token = secrets.token_urlsafe(32)
    with Session(engine) as session, session.begin():
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            session.add(User(name=name, token_hash=hash_token(token)))
        else:
            user.token_hash = hash_token(token)
    return token


def user_for_token(session: Session, token: str) -> User | None:
    return session.scalar(select(User).where(User.token_hash == hash_token(token)))
