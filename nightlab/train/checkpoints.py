"""`tinker://` paths <-> checkpoint directories under the data dir; run and checkpoint metadata in SQLite.

A path reads `tinker://<training_run_id>/weights/<name>` (adapter + optimizer state, to resume training) or
`tinker://<training_run_id>/sampler_weights/<name>` (adapter only, to sample). The database lets a restarted
server list and load everything it saved. Writes are atomic and durable: a checkpoint is written to a
temporary directory, flushed to disk, renamed into place and recorded, so a crash, Ctrl-C or power loss never
leaves a half-written checkpoint under a real name. At start every recorded checkpoint is checked against its
files; one whose files are gone or changed is logged, listed with `files_missing`, and refused on load with a
clear error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from nightlab.train.errors import UserError

logger = logging.getLogger(__name__)

SCHEME = "tinker://"
Kind = Literal["training", "sampler"]
SEGMENT_OF_KIND: dict[Kind, str] = {"training": "weights", "sampler": "sampler_weights"}
KIND_OF_SEGMENT: dict[str, Kind] = {v: k for k, v in SEGMENT_OF_KIND.items()}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # use .match; \Z, as $ lets a final newline in
MAX_TTL_S = 10 * 365 * 24 * 3600  # ten years: any longer is "forever", which is leaving ttl_seconds out
MAX_PAGE_LIMIT = 10_000
MAX_PAGE_OFFSET = 2**31 - 1
_TEMP_PREFIX = ".tmp-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS training_runs (
    run_id TEXT PRIMARY KEY, owner TEXT NOT NULL, session_id TEXT NOT NULL, base_model TEXT NOT NULL,
    lora TEXT NOT NULL, created_at REAL NOT NULL, last_request_time REAL NOT NULL, user_metadata TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, checkpoint_id TEXT NOT NULL, kind TEXT NOT NULL, directory TEXT NOT NULL,
    created_at REAL NOT NULL, size_bytes INTEGER NOT NULL, user_metadata TEXT, expires_at REAL,
    PRIMARY KEY (run_id, checkpoint_id));
"""


def open_db(path: Path) -> sqlite3.Connection:
    """One connection shared by the server's threads (guarded by the caller's lock); WAL keeps reads cheap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass
class TrainingRun:
    run_id: str
    owner: str
    session_id: str
    base_model: str
    lora: dict[str, Any]
    created_at: float
    last_request_time: float
    user_metadata: dict[str, Any] | None


@dataclass
class Checkpoint:
    run_id: str
    checkpoint_id: str  # "weights/<name>" or "sampler_weights/<name>", as the SDK names it
    kind: Kind
    directory: Path
    created_at: float
    size_bytes: int
    user_metadata: dict[str, str] | None
    expires_at: float | None
    missing: str | None = None  # what is wrong with its files, if they are gone or changed since it was saved

    @property
    def tinker_path(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.checkpoint_id}"

    def to_json(self) -> dict[str, Any]:
        """The SDK's `Checkpoint` shape."""
        return {
            "checkpoint_id": self.checkpoint_id,
            "checkpoint_type": self.kind,
            "time": iso(self.created_at),
            "tinker_path": self.tinker_path,
            "size_bytes": self.size_bytes,
            "public": False,
            "user_metadata": self.user_metadata,
            "expires_at": iso(self.expires_at),
            "files_missing": self.missing is not None,  # nightlab's own field; SDKs ignore it
        }


def parse_path(tinker_path: str) -> tuple[str, Kind, str]:
    """Split a tinker path into (training_run_id, kind, checkpoint_id), or say what a valid one looks like."""
    parts = tinker_path.removeprefix(SCHEME).split("/") if tinker_path.startswith(SCHEME) else []
    if len(parts) != 3 or parts[1] not in KIND_OF_SEGMENT or not NAME_RE.match(parts[2]) or not parts[0]:
        raise UserError(
            f"invalid checkpoint path {tinker_path!r}: expected tinker://<training_run_id>/weights/<name> "
            "or tinker://<training_run_id>/sampler_weights/<name>"
        )
    return parts[0], KIND_OF_SEGMENT[parts[1]], f"{parts[1]}/{parts[2]}"


def check_new_checkpoint(name: str, ttl_seconds: int | None) -> None:
    """Refuse a checkpoint name or lifetime that cannot be stored, before anything is written."""
    if not NAME_RE.match(name):
        raise UserError(f"invalid checkpoint name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
    if ttl_seconds is not None and not 1 <= ttl_seconds <= MAX_TTL_S:
        raise UserError(
            f"ttl_seconds must be between 1 and {MAX_TTL_S} (ten years), got {ttl_seconds}; "
            "leave it out to keep the checkpoint until it is deleted"
        )


def check_page(limit: int, offset: int) -> None:
    """Refuse a listing page the database cannot express, saying which values are allowed."""
    if not 1 <= limit <= MAX_PAGE_LIMIT:
        raise UserError(f"limit must be between 1 and {MAX_PAGE_LIMIT}, got {limit}")
    if not 0 <= offset <= MAX_PAGE_OFFSET:
        raise UserError(f"offset must be between 0 and {MAX_PAGE_OFFSET}, got {offset}")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _damage(directory: Path, size_bytes: int) -> str | None:
    """What is wrong with a saved checkpoint's files (a directory is never changed once saved), or None."""
    if not directory.is_dir():
        return f"its directory {directory} is missing"
    size = _dir_size(directory)
    if size != size_bytes:
        return f"its files in {directory} hold {size} bytes, not the {size_bytes} it was saved with"
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a directory opens read-only too, and fsync flushes its entries
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, deepest first, then `root` itself."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(root)


class CheckpointStore:
    """Training runs and their checkpoints, owned by API keys; the only code touching checkpoint dirs."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "checkpoints"
        self.ephemeral_root = Path(data_dir) / "ephemeral"
        self._lock = threading.Lock()
        self._db = open_db(Path(data_dir) / "service.db")
        self._db.executescript(_SCHEMA)
        self._sweep()
        self._damaged: dict[tuple[str, str], str] = {}  # (run_id, checkpoint_id) -> what is wrong
        self._verify()

    def _sweep(self) -> None:
        """Remove what an interrupted save left, and the previous process's ephemeral sampler weights."""
        shutil.rmtree(self.ephemeral_root, ignore_errors=True)
        self.ephemeral_root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT directory FROM checkpoints")}
        for directory in self.root.glob("*/*/*") if self.root.is_dir() else []:
            if str(directory.relative_to(self.root)) not in known:
                shutil.rmtree(directory, ignore_errors=True)

    def _verify(self) -> None:
        """Check every recorded checkpoint against its files: what a crash, a full disk or a hand took away
        is named now, in the log, rather than failing a load later."""
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, checkpoint_id, directory, size_bytes FROM checkpoints"
            ).fetchall()
        for run_id, checkpoint_id, directory, size_bytes in rows:
            problem = _damage(self.root / directory, size_bytes)
            if problem is not None:
                self._damaged[(run_id, checkpoint_id)] = problem
                logger.warning(
                    "checkpoint %s%s/%s: %s; it is listed with files_missing and refused on load until its "
                    "files are restored or it is deleted",
                    SCHEME,
                    run_id,
                    checkpoint_id,
                    problem,
                )

    # --- training runs ---
    def add_run(
        self,
        run_id: str,
        owner: str,
        session_id: str,
        base_model: str,
        lora: dict[str, Any],
        user_metadata: dict[str, Any] | None,
    ) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO training_runs VALUES (?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    owner,
                    session_id,
                    base_model,
                    json.dumps(lora),
                    now,
                    now,
                    json.dumps(user_metadata),
                ),
            )

    def touch_run(self, run_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE training_runs SET last_request_time=? WHERE run_id=?", (time.time(), run_id)
            )

    def run(self, run_id: str, owner: str) -> TrainingRun:
        with self._lock:
            row = self._db.execute("SELECT * FROM training_runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"unknown training run {run_id!r}", 404)
        if row["owner"] != owner:
            raise UserError(f"training run {run_id!r} belongs to another API key", 403)
        return self._run_of(row)

    def runs(
        self, owner: str, limit: int = 20, offset: int = 0, session_id: str | None = None
    ) -> tuple[list[TrainingRun], int]:
        check_page(limit, offset)
        where, args = "owner=?", [owner]
        if session_id is not None:
            where, args = where + " AND session_id=?", [*args, session_id]
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM training_runs WHERE {where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM training_runs WHERE {where} ORDER BY created_at DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        return [self._run_of(r) for r in rows], total

    @staticmethod
    def _run_of(row: sqlite3.Row) -> TrainingRun:
        return TrainingRun(
            run_id=row["run_id"],
            owner=row["owner"],
            session_id=row["session_id"],
            base_model=row["base_model"],
            lora=json.loads(row["lora"]),
            created_at=row["created_at"],
            last_request_time=row["last_request_time"],
            user_metadata=json.loads(row["user_metadata"]) if row["user_metadata"] else None,
        )

    # --- checkpoints ---
    def resolve(self, tinker_path: str, owner: str) -> tuple[TrainingRun, Checkpoint]:
        """The run and checkpoint a path names, if this owner may read it."""
        run_id, _, checkpoint_id = parse_path(tinker_path)
        run = self.run(run_id, owner)
        for ckpt in self.checkpoints(run_id, owner):
            if ckpt.checkpoint_id == checkpoint_id:
                problem = ckpt.missing or _damage(ckpt.directory, ckpt.size_bytes)  # may be gone since start
                if problem is not None:
                    self._damaged[(run_id, checkpoint_id)] = problem
                    raise UserError(
                        f"checkpoint {tinker_path} cannot be loaded: {problem}; restore its files, "
                        "or delete it (RestClient.delete_checkpoint_from_tinker_path)",
                        410,
                    )
                return run, ckpt
        raise UserError(
            f"no checkpoint {tinker_path!r}; list them with RestClient.list_checkpoints({run_id!r})", 404
        )

    def checkpoints(self, run_id: str, owner: str) -> list[Checkpoint]:
        self.run(run_id, owner)
        return self._select("run_id=?", [run_id])

    def user_checkpoints(self, owner: str, limit: int = 100, offset: int = 0) -> tuple[list[Checkpoint], int]:
        check_page(limit, offset)
        where = "run_id IN (SELECT run_id FROM training_runs WHERE owner=?)"
        everything = self._select(where, [owner])
        return everything[offset : offset + limit], len(everything)

    def count(self, owner: str, besides: tuple[str, Kind, str] | None = None) -> int:
        """How many checkpoints `owner` holds, not counting `besides` (run_id, kind, name): one that a save
        under that name would replace."""
        where, args = "run_id IN (SELECT run_id FROM training_runs WHERE owner=?)", [owner]
        if besides is not None:
            run_id, kind, name = besides
            where += " AND NOT (run_id=? AND checkpoint_id=?)"
            args += [run_id, f"{SEGMENT_OF_KIND[kind]}/{name}"]
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM checkpoints WHERE {where}", args).fetchone()[0]

    def _select(self, where: str, args: list[Any]) -> list[Checkpoint]:
        self._expire()
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM checkpoints WHERE {where} ORDER BY created_at", args
            ).fetchall()
        return [
            Checkpoint(
                run_id=r["run_id"],
                checkpoint_id=r["checkpoint_id"],
                kind=r["kind"],
                directory=self.root / r["directory"],
                created_at=r["created_at"],
                size_bytes=r["size_bytes"],
                user_metadata=json.loads(r["user_metadata"]) if r["user_metadata"] else None,
                expires_at=r["expires_at"],
                missing=self._damaged.get((r["run_id"], r["checkpoint_id"])),
            )
            for r in rows
        ]

    def _expire(self) -> None:
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, checkpoint_id, directory FROM checkpoints "
                "WHERE expires_at IS NOT NULL AND expires_at < ?",
                (time.time(),),
            ).fetchall()
            for r in rows:
                self._db.execute("DELETE FROM checkpoints WHERE run_id=? AND checkpoint_id=?", (r[0], r[1]))
        for r in rows:
            shutil.rmtree(self.root / r[2], ignore_errors=True)

    def save(
        self,
        run_id: str,
        owner: str,
        kind: Kind,
        name: str,
        write: Callable[[Path], None],
        *,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
        ttl_seconds: int | None = None,
    ) -> Checkpoint:
        """Write a checkpoint with `write(directory)` and record it; refuse to replace one silently.

        Each write gets a fresh directory, renamed into place when complete and recorded in the same step that
        retires the one it replaces, so readers (and the engine's cache of adapters by path) never see a
        directory change under them.
        """
        check_new_checkpoint(name, ttl_seconds)
        self.run(run_id, owner)
        checkpoint_id = f"{SEGMENT_OF_KIND[kind]}/{name}"
        with self._lock:
            previous = self._db.execute(
                "SELECT directory FROM checkpoints WHERE run_id=? AND checkpoint_id=?",
                (run_id, checkpoint_id),
            ).fetchone()
        if previous and not overwrite:
            raise UserError(
                f"checkpoint {SCHEME}{run_id}/{checkpoint_id} exists; pass overwrite=True to replace it"
            )
        relative = Path(run_id.replace(":", "_")) / SEGMENT_OF_KIND[kind] / f"{name}.{uuid.uuid4().hex[:8]}"
        final = self.root / relative
        self._write_in_place(write, final)
        now = time.time()
        ckpt = Checkpoint(
            run_id=run_id,
            checkpoint_id=checkpoint_id,
            kind=kind,
            directory=final,
            created_at=now,
            size_bytes=_dir_size(final),
            user_metadata=user_metadata,
            expires_at=now + ttl_seconds if ttl_seconds else None,
        )
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    checkpoint_id,
                    kind,
                    str(relative),
                    now,
                    ckpt.size_bytes,
                    json.dumps(user_metadata) if user_metadata else None,
                    ckpt.expires_at,
                ),
            )
        self._damaged.pop((run_id, checkpoint_id), None)
        if previous:
            shutil.rmtree(self.root / previous["directory"], ignore_errors=True)
        return ckpt

    def _write_in_place(self, write: Callable[[Path], None], final: Path) -> None:
        """Write beside `final`, flush to disk, then rename into place: contents reach the disk before the
        name that publishes them, and the rename (and any new directory above it) right after."""
        tmp = final.with_name(_TEMP_PREFIX + final.name)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            _fsync_tree(tmp)
            tmp.rename(final)
            for directory in (final.parent, final.parent.parent, self.root):
                _fsync(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, run_id: str, checkpoint_id: str, owner: str) -> None:
        ckpt = next((c for c in self.checkpoints(run_id, owner) if c.checkpoint_id == checkpoint_id), None)
        if ckpt is None:
            raise UserError(f"no checkpoint {SCHEME}{run_id}/{checkpoint_id}", 404)
        with self._lock:
            self._db.execute(
                "DELETE FROM checkpoints WHERE run_id=? AND checkpoint_id=?", (run_id, checkpoint_id)
            )
        self._damaged.pop((run_id, checkpoint_id), None)
        shutil.rmtree(ckpt.directory, ignore_errors=True)

    def ephemeral_dir(self, model_id: str) -> Path:
        """Where a training model's unnamed sampler weights (save_weights_and_get_sampling_client) live: only
        as long as the model, and never across a restart."""
        return self.ephemeral_root / model_id.replace(":", "_")

    def publish_inflight(self, model_id: str, write: Callable[[Path], None]) -> Path:
        """Write the model's shared `inflight` sampler weights; return the path every inflight sampler uses.

        That path is a symlink switched atomically to each new version, so samplers created by earlier
        inflight saves sample the newest weights from their next batch on. The version before stays on disk
        until the next save, for a sampler that resolved the link just before the switch.
        """
        root = self.ephemeral_dir(model_id)
        root.mkdir(parents=True, exist_ok=True)
        link = root / "inflight"
        previous = os.readlink(link) if link.is_symlink() else None  # a name in `root`, as written below
        version = root / f"inflight-{uuid.uuid4().hex[:8]}"
        write(version)
        staged = root / f"{_TEMP_PREFIX}inflight-{uuid.uuid4().hex[:8]}"
        staged.symlink_to(version.name)
        os.replace(staged, link)
        for old in root.glob("inflight-*"):
            if old.name not in (version.name, previous):
                shutil.rmtree(old, ignore_errors=True)
        return link

    def drop_ephemeral(self, model_id: str) -> None:
        shutil.rmtree(self.ephemeral_dir(model_id), ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()
