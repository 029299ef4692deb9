"""API keys, client sessions and heartbeats.

An API key is an owner: it sees only the sessions, runs and checkpoints it created. With keys configured the
server accepts only those; with none it serves one local owner (and the CLI keeps it on 127.0.0.1). Keys are
never stored, only a digest that names their owner.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab.train.checkpoints import check_page, open_db
from nightlab.train.errors import UserError
from nightlab.train.settings import API_KEY_PREFIX, ServeSettings

LOCAL_OWNER = "local"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL, last_heartbeat REAL NOT NULL,
    tags TEXT, user_metadata TEXT, display_name TEXT, sdk_version TEXT, status TEXT NOT NULL);
"""


def owner_of_key(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def check_count(count: int, limit: int, what: str, setting: str) -> None:
    """Refuse one more of `what` to an API key that holds `count` of them: a 429 naming the setting."""
    if count >= limit:
        raise UserError(
            f"this API key already holds {count} {what}, the most allowed ({setting}={limit}); "
            "free some first or ask the server's operator to raise the limit",
            429,
        )


def check_size(field: str, value: Any, limit: int, setting: str) -> None:
    """Refuse client text (counted in characters) or metadata (in bytes of JSON) larger than `limit`."""
    size, unit = (len(value), "characters") if isinstance(value, str) else (len(json.dumps(value)), "bytes")
    if size > limit:
        raise UserError(f"{field} is {size} {unit}, more than the {limit} allowed ({setting})")


@dataclass
class Session:
    session_id: str
    owner: str
    created_at: float
    last_heartbeat: float
    tags: list[str]
    user_metadata: dict[str, Any] | None
    display_name: str | None
    status: dict[str, Any]  # the SDK's SessionStatus: {"type": "active"} or {"type": "client_finished", ...}

    @property
    def finished(self) -> bool:
        return self.status.get("type") != "active"


class SessionStore:
    """Authenticates keys and keeps sessions (in SQLite, so listing them survives a restart)."""

    def __init__(
        self,
        data_dir: Path,
        api_keys: list[str],
        *,
        max_active: int = ServeSettings.max_active_sessions_per_key,
        max_display_name_chars: int = ServeSettings.max_display_name_chars,
        max_metadata_bytes: int = ServeSettings.max_metadata_bytes,
    ) -> None:
        self._owners = {key: owner_of_key(key) for key in api_keys}
        self.max_active = max_active
        self.max_display_name_chars = max_display_name_chars
        self.max_metadata_bytes = max_metadata_bytes
        self._lock = threading.Lock()
        self._db = open_db(Path(data_dir) / "service.db")
        self._db.executescript(_SCHEMA)

    def authenticate(self, key: str | None) -> str:
        """The owner behind an `X-API-Key` header, or a 401 that says what is wrong."""
        if not self._owners:
            return LOCAL_OWNER
        if not key:
            raise UserError(
                "missing X-API-Key header: pass api_key= to the tinker client or set TINKER_API_KEY", 401
            )
        owner = self._owners.get(key)
        if owner is None:
            hint = "" if key.startswith(API_KEY_PREFIX) else f" (keys start with {API_KEY_PREFIX!r})"
            raise UserError(f"unknown API key{hint}; use one the server was started with (--api-key)", 401)
        return owner

    def create(
        self,
        owner: str,
        tags: list[str],
        user_metadata: dict[str, Any] | None,
        display_name: str | None,
        sdk_version: str | None,
    ) -> Session:
        """A new active session; refused past the key's active sessions or the metadata caps."""
        if display_name is not None:
            check_size("display_name", display_name, self.max_display_name_chars, "max_display_name_chars")
        for field, value in (("tags", tags), ("user_metadata", user_metadata), ("sdk_version", sdk_version)):
            self.check_metadata(field, value)
        check_count(
            self.active_count(owner), self.max_active, "active sessions", "max_active_sessions_per_key"
        )
        now = time.time()
        session = Session(
            f"sess-{uuid.uuid4().hex[:20]}",
            owner,
            now,
            now,
            tags,
            user_metadata,
            display_name,
            {"type": "active"},
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    session.session_id,
                    owner,
                    now,
                    now,
                    json.dumps(tags),
                    json.dumps(user_metadata),
                    display_name,
                    sdk_version,
                    json.dumps(session.status),
                ),
            )
        return session

    def check_metadata(self, field: str, value: Any) -> None:
        check_size(field, value, self.max_metadata_bytes, "max_metadata_bytes")

    def active_count(self, owner: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM sessions WHERE owner=? AND status=?",
                (owner, json.dumps({"type": "active"})),
            ).fetchone()
        return row[0]

    def get(self, session_id: str, owner: str) -> Session:
        with self._lock:
            row = self._db.execute("SELECT * FROM sessions WHERE session_id=?", (session_id,)).fetchone()
        if row is None:
            raise UserError(f"unknown session {session_id!r}", 404)
        if row["owner"] != owner:
            raise UserError(f"session {session_id!r} belongs to another API key", 403)
        return Session(
            session_id=row["session_id"],
            owner=row["owner"],
            created_at=row["created_at"],
            last_heartbeat=row["last_heartbeat"],
            tags=json.loads(row["tags"] or "[]"),
            user_metadata=json.loads(row["user_metadata"] or "null"),
            display_name=row["display_name"],
            status=json.loads(row["status"]),
        )

    def active(self, session_id: str, owner: str) -> Session:
        """A session that still accepts work; a finished one answers 410, which stops the SDK's heartbeat."""
        session = self.get(session_id, owner)
        if session.finished:
            raise UserError(f"session {session_id!r} has finished; create a new ServiceClient", 410)
        return session

    def heartbeat(self, session_id: str, owner: str) -> None:
        self.active(session_id, owner)
        with self._lock:
            self._db.execute(
                "UPDATE sessions SET last_heartbeat=? WHERE session_id=?", (time.time(), session_id)
            )

    def finish(self, session_id: str, owner: str, reason: dict[str, Any] | None, detail: str | None) -> None:
        """Mark the session finished; the first reason wins, as the SDK documents."""
        self.check_metadata("reason", reason)
        self.check_metadata("detail", detail)
        session = self.get(session_id, owner)
        if session.finished:
            return
        status = {"type": "client_finished", "reason": reason or {"type": "success"}, "detail": detail}
        with self._lock:
            self._db.execute(
                "UPDATE sessions SET status=? WHERE session_id=?", (json.dumps(status), session_id)
            )

    def expire(self, idle_s: float) -> list[str]:
        """End active sessions that sent no heartbeat for `idle_s` (status `cancelled`); return their ids."""
        active = json.dumps({"type": "active"})
        cancelled = json.dumps({"type": "cancelled", "detail": f"no heartbeat for {idle_s:.0f} s"})
        with self._lock:
            rows = self._db.execute(
                "SELECT session_id FROM sessions WHERE status=? AND last_heartbeat<?",
                (active, time.time() - idle_s),
            ).fetchall()
            ids = [r[0] for r in rows]
            self._db.executemany(
                "UPDATE sessions SET status=? WHERE session_id=?", [(cancelled, i) for i in ids]
            )
        return ids

    def list(self, owner: str, limit: int = 20, offset: int = 0) -> tuple[list[str], int]:
        check_page(limit, offset)
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM sessions WHERE owner=?", (owner,)).fetchone()[0]
            rows = self._db.execute(
                "SELECT session_id FROM sessions WHERE owner=? ORDER BY created_at DESC LIMIT ? OFFSET ?",
                (owner, limit, offset),
            ).fetchall()
        return [r[0] for r in rows], total

    def close(self) -> None:
        with self._lock:
            self._db.close()
