"""The journal: an append-only, hash-chained SQLite record of every run and experiment.

It is the source of truth; results.tsv, plots and reports are views derived from it. Each row stores the
sha256 of its own canonical content plus the previous row's hash, so an edited, inserted or deleted row breaks
the chain and `verify_chain` names it. A chain alone cannot show that its newest rows were cut off, so the
head of every chain (row count and last hash) is also written, after each commit, to `journal.head` next to
the database; a journal shorter than its head, or different at the head's row, is refused. The only mutable
table is `pending`: the marker of the experiment in flight, which lets a killed run resume without losing or
duplicating an experiment.

Rows leave this module only as typed records (`Run`, `Experiment`, `HeldoutResult`, `Pending`): the JSON
columns are parsed here, once, so no caller handles a row dict or a JSON string.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from nightlab.errors import NightlabError

STATE_DIR = ".nightlab"
JOURNAL_NAME = "journal.sqlite"
HEAD_SUFFIX = ".head"
GENESIS = "0" * 64

# Column lists double as the canonical order that row hashes are computed over.
RUN_COLUMNS = [
    "tag",
    "branch",
    "source_branch",
    "base_commit",
    "created_at",
    "config_json",
    "harness_json",
    "preserved_json",
    "metric_name",
    "goal",
]
EXPERIMENT_COLUMNS = [
    "run_id",
    "number",
    "kind",
    "commit_sha",
    "parent_commit",
    "patch",
    "patch_format",
    "diff",
    "description",
    "rationale",
    "proposer",
    "params_json",
    "metric",
    "metric_runs_json",
    "extra_json",
    "decision",
    "reason",
    "margin",
    "sigmas",
    "probability",
    "noise",
    "best_before",
    "timings_json",
    "exit_code",
    "peak_rss_mb",
    "log_path",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "sandboxed",
    "sandbox_reason",
    "started_at",
    "finished_at",
    "train_limit",
    "evaluate_limit",
    "best_reruns_json",
    "quarantine",
    "curve_json",
]
HELDOUT_COLUMNS = [
    "run_id",
    "commit_sha",
    "label",
    "validation",
    "test",
    "extra_json",
    "log_path",
    "created_at",
    "sandboxed",
    "sandbox_reason",
]
CHAINED = {"runs": RUN_COLUMNS, "experiments": EXPERIMENT_COLUMNS, "heldout": HELDOUT_COLUMNS}
# Columns added after journals were first written: an older database gets them on open, and a row's hash
# leaves them out while they are NULL, so rows written before them still verify.
ADDED_COLUMNS = {
    "experiments": ("train_limit", "evaluate_limit", "best_reruns_json", "quarantine", "curve_json"),
    "heldout": ("sandboxed", "sandbox_reason"),
}


class ChainError(NightlabError, RuntimeError):
    """The journal cannot be trusted as it is: a row was edited, inserted or removed outside nightlab, its
    head record is missing, or it was written by a nightlab with another schema."""


def _normalize(column: str, value: Any) -> Any:
    """Coerce to what SQLite will hand back, so the hash computed on insert matches the one re-read later."""
    if value is None:
        return None
    kind = _TYPES.get(column, "TEXT")
    if kind == "REAL":
        return float(value)
    if kind == "INTEGER":
        return int(value)
    return str(value)


def _canonical_hash(table: str, row: dict[str, Any], prev_hash: str) -> str:
    added = ADDED_COLUMNS.get(table, ())
    content = {c: row.get(c) for c in CHAINED[table] if c not in added or row.get(c) is not None}
    content["prev_hash"] = prev_hash
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Run:
    """One `nightlab run` session series over a workspace (resumable by tag)."""

    id: int
    tag: str
    branch: str
    source_branch: str
    base_commit: str
    config: dict[str, Any]
    harness: dict[str, str]
    preserved: list[str]
    metric_name: str
    goal: str


@dataclass(frozen=True)
class Experiment:
    """One row of the experiments table; each `<name>_json` column is the parsed field `<name>`.

    A column stored as NULL reads back as the field's default: "" for the texts every row has, an empty list
    or dict for the JSON columns, None for the rest (a commit that was never made, a number never measured).
    """

    run_id: int
    number: int
    kind: str  # baseline | candidate
    decision: str = ""  # keep discard crash timeout invalid overrun quarantine duplicate aborted stale
    reason: str = ""
    commit_sha: str | None = None
    parent_commit: str | None = None
    patch: str | None = None
    patch_format: str | None = None
    diff: str | None = None
    description: str = ""
    rationale: str = ""
    proposer: str = ""
    params: dict[str, float] = field(default_factory=dict)
    metric: float | None = None  # the mean of `metric_runs`
    metric_runs: list[float] = field(default_factory=list)  # the first run, then the confirmation re-runs
    extra: dict[str, float] = field(default_factory=dict)
    margin: float | None = None
    sigmas: float | None = None
    probability: float | None = None
    noise: float | None = None
    best_before: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per phase, in the order they ran
    exit_code: int | None = None
    peak_rss_mb: float | None = None
    log_path: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    sandboxed: bool | None = None
    sandbox_reason: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    train_limit: float | None = None
    evaluate_limit: float | None = None
    best_reruns: list[float] = field(default_factory=list)  # the best re-measured beside the re-runs
    quarantine: str | None = None  # why the result was too good to take on its word
    curve: list[list[float]] = field(default_factory=list)  # [budget fraction, progress] of the first run


@dataclass(frozen=True)
class HeldoutResult:
    """One row of the heldout table: a commit trained afresh, scored on validation and on the test split."""

    run_id: int
    commit_sha: str
    label: str  # baseline | best
    validation: float | None = None
    test: float | None = None
    extra: dict[str, str] = field(default_factory=dict)  # {"reason": why a score is missing}
    log_path: str | None = None
    created_at: float | None = None
    sandboxed: bool | None = None  # None in rows written before nightlab recorded it
    sandbox_reason: str | None = None


@dataclass(frozen=True)
class Pending:
    """The marker of the experiment in flight: its record as far as it is known before it ends (what it is,
    not how it went), so that a resume can record it as interrupted."""

    experiment: Experiment
    pgid: int | None = None  # the running phase's process group, so that a resume can stop it
    started_at: float = 0.0  # when the marker was last written; set by the journal

    @property
    def number(self) -> int:
        return self.experiment.number


R = TypeVar("R", Experiment, HeldoutResult)


def _sql_types(*records: type[Experiment | HeldoutResult]) -> dict[str, str]:
    """Each column's SQLite type but TEXT, from its field's annotation: INTEGER for whole numbers and flags,
    REAL for the other numbers. Runs share these names (`created_at`)."""
    sql = {"int": "INTEGER", "bool": "INTEGER", "float": "REAL"}
    kinds = {f.name: str(f.type).split(" | ")[0] for record in records for f in fields(record)}
    return {name: sql[kind] for name, kind in kinds.items() if kind in sql}


_TYPES = _sql_types(Experiment, HeldoutResult)

# The JSON columns and the fields they parse into; dicts are written with sorted keys except the timings,
# whose order is the order the phases ran.
_JSON_FIELDS = {
    "params_json": "params",
    "metric_runs_json": "metric_runs",
    "extra_json": "extra",
    "timings_json": "timings",
    "best_reruns_json": "best_reruns",
    "curve_json": "curve",
}
_JSON_COLUMNS = {name: column for column, name in _JSON_FIELDS.items()}
_UNSORTED_JSON = {"timings_json"}
# An added JSON column with nothing to say stays NULL, so the row's hash is the one it had before the column.
_ADDED_JSON = {c for added in ADDED_COLUMNS.values() for c in added if c in _JSON_FIELDS}


def _to_columns(record: Experiment | HeldoutResult, columns: list[str]) -> dict[str, Any]:
    """The row to store for a record: JSON columns serialised (empty added ones as NULL), flags as 0/1."""
    row: dict[str, Any] = {}
    for column in columns:
        value = getattr(record, _JSON_FIELDS.get(column, column))
        if column in _ADDED_JSON and not value:
            value = None
        elif column in _JSON_FIELDS:
            value = json.dumps(value, sort_keys=column not in _UNSORTED_JSON)
        elif isinstance(value, bool):
            value = int(value)
        row[column] = value
    return row


def _from_columns(cls: type[R], row: sqlite3.Row | dict[str, Any]) -> R:
    """The record of a stored row (or of its columns in a marker); a NULL, or a column the row predates,
    becomes the field's default (see `Experiment`)."""
    values: dict[str, Any] = {}
    have = set(row.keys())
    for f in fields(cls):
        column = _JSON_COLUMNS.get(f.name, f.name)
        value = row[column] if column in have else None
        if value is None:
            continue  # the field's default
        if column in _JSON_FIELDS:
            value = json.loads(value)
        elif f.name == "sandboxed":
            value = bool(value)
        values[f.name] = value
    return cls(**values)


def _pending_from(row: sqlite3.Row, run_id: int) -> Pending:
    payload = json.loads(row["payload"])
    if "experiment" in payload:
        experiment = _from_columns(Experiment, payload["experiment"])
    else:
        experiment = _older_marker(run_id, row["number"], payload)
    return Pending(experiment, pgid=payload.get("pgid"), started_at=row["started_at"])


def _older_marker(run_id: int, number: int, payload: dict[str, Any]) -> Experiment:
    """What a marker of an older nightlab announced: a few fields by other names, the spend under "usage"."""
    renamed = {"commit": "commit_sha", "parent": "parent_commit"}
    known = {f.name for f in fields(Experiment)}
    values = {renamed.get(k, k): v for k, v in {**payload, **(payload.get("usage") or {})}.items()}
    return Experiment(
        run_id=run_id, number=number, **{k: v for k, v in values.items() if k in known and v is not None}
    )


class Journal:
    """Thin access layer over the SQLite file; every write is one transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.head_path = self.path.with_suffix(HEAD_SUFFIX)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self._create()
        if not self.head_path.exists() and not any(h["rows"] for h in self._heads().values()):
            self._write_head()  # a new journal starts with its head, so a missing one always means trouble

    @classmethod
    def for_workspace(cls, root: Path) -> Journal:
        return cls(Path(root) / STATE_DIR / JOURNAL_NAME)

    def close(self) -> None:
        self.db.close()

    def _create(self) -> None:
        for table, columns in CHAINED.items():
            cols = ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in columns)
            self.db.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols}, "
                "prev_hash TEXT NOT NULL, row_hash TEXT NOT NULL)"
            )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS pending (run_id INTEGER NOT NULL, number INTEGER NOT NULL, "
            "payload TEXT NOT NULL, started_at REAL NOT NULL, PRIMARY KEY (run_id, number))"
        )
        self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS experiments_once ON experiments(run_id, number)")
        for table, columns in CHAINED.items():
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for column in ADDED_COLUMNS.get(table, ()):
                if column not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {_TYPES.get(column, 'TEXT')}")
                    have.add(column)
            missing = [c for c in columns if c not in have]
            if missing:
                raise ChainError(
                    f"{self.path}: table {table} lacks column(s) {', '.join(missing)}: it was written by "
                    f"another version of nightlab; move {self.path.parent} aside to start a new journal"
                )

    # --- chained inserts -------------------------------------------------------------------------------

    def _append(
        self, table: str, row: dict[str, Any], *, delete_pending: tuple[int, int] | None = None
    ) -> int:
        columns = CHAINED[table]
        unknown = set(row) - set(columns)
        if unknown:
            raise KeyError(f"{table}: unknown column(s) {sorted(unknown)}")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            last = self.db.execute(f"SELECT row_hash FROM {table} ORDER BY id DESC LIMIT 1").fetchone()
            prev = last[0] if last else GENESIS
            values = {c: _normalize(c, row.get(c)) for c in columns}
            values["prev_hash"] = prev
            values["row_hash"] = _canonical_hash(table, values, prev)
            names = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            cur = self.db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", list(values.values()))
            if delete_pending:
                self.db.execute("DELETE FROM pending WHERE run_id=? AND number=?", delete_pending)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._write_head()
        return int(cur.lastrowid)

    # --- the chain heads -------------------------------------------------------------------------------

    def _heads(self) -> dict[str, dict[str, Any]]:
        heads = {}
        for table in CHAINED:
            (count,) = self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
            last = self.db.execute(f"SELECT id, row_hash FROM {table} ORDER BY id DESC LIMIT 1").fetchone()
            heads[table] = {
                "rows": count,
                "last_id": last[0] if last else None,
                "last_hash": last[1] if last else GENESIS,
            }
        return heads

    def _write_head(self) -> None:
        """Replace journal.head atomically. Written after the commit, so it never runs ahead of the database:
        a crash in between leaves it one row behind, which `verify_chain` accepts."""
        tmp = self.head_path.with_suffix(HEAD_SUFFIX + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(self._heads(), f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.head_path)

    def _read_head(self) -> dict[str, dict[str, Any]] | None:
        try:
            data = json.loads(self.head_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ChainError(
                f"{self.head_path} is unreadable ({exc}): the journal's end cannot be checked"
            ) from exc
        if not isinstance(data, dict) or not all(isinstance(data.get(t), dict) for t in CHAINED):
            raise ChainError(f"{self.head_path} is malformed: the journal's end cannot be checked")
        return data

    def _check_head(self, head: dict[str, dict[str, Any]] | None, counts: dict[str, int]) -> None:
        """The database must still hold every row the head recorded, the last one unchanged."""
        if head is None:
            if any(counts.values()):
                raise ChainError(
                    f"{self.head_path} is missing, so rows cut from the end of the journal could not be "
                    "noticed; it was deleted, or the journal was written by an older nightlab"
                )
            return
        for table in CHAINED:
            want, have = head[table], counts[table]
            if have < want["rows"]:
                raise ChainError(
                    f"journal chain broken at the end of {table}: it has {have} row(s) but "
                    f"{self.head_path.name} records {want['rows']} ending at row id={want['last_id']}; "
                    "rows were removed from the end"
                )
            if want["rows"]:
                row = self.db.execute(
                    f"SELECT row_hash FROM {table} WHERE id=?", (want["last_id"],)
                ).fetchone()
                if row is None or row[0] != want["last_hash"]:
                    raise ChainError(
                        f"journal chain broken at {table} row id={want['last_id']}: it is not the row "
                        f"{self.head_path.name} recorded as the last one; rows at the end were replaced"
                    )

    def verify_chain(self) -> int:
        """Re-hash every chained row in order, then check the head; raise ChainError naming the first bad row.

        The head is read before the rows: it only ever describes a committed state, and the tables only grow,
        so a run appending meanwhile cannot make a reader fail. Returns the number of rows checked.
        """
        head = self._read_head()
        counts: dict[str, int] = {}
        for table in CHAINED:
            counts[table] = 0
            prev = GENESIS
            for row in self.db.execute(f"SELECT * FROM {table} ORDER BY id"):
                data = dict(row)
                where = f"{table} row id={data['id']}"
                if table == "experiments":
                    where += f" (run {data['run_id']}, experiment {data['number']})"
                if data["prev_hash"] != prev:
                    raise ChainError(
                        f"journal chain broken at {where}: a row before it was removed or inserted"
                    )
                if _canonical_hash(table, data, prev) != data["row_hash"]:
                    raise ChainError(f"journal chain broken at {where}: its content was modified")
                prev = data["row_hash"]
                counts[table] += 1
        self._check_head(head, counts)
        return sum(counts.values())

    # --- runs ------------------------------------------------------------------------------------------

    def create_run(
        self,
        *,
        tag: str,
        branch: str,
        source_branch: str,
        base_commit: str,
        config: dict[str, Any],
        harness: dict[str, str],
        preserved: list[str],
        metric_name: str,
        goal: str,
    ) -> Run:
        self._append(
            "runs",
            {
                "tag": tag,
                "branch": branch,
                "source_branch": source_branch,
                "base_commit": base_commit,
                "created_at": time.time(),
                "config_json": json.dumps(config, sort_keys=True),
                "harness_json": json.dumps(harness, sort_keys=True),
                "preserved_json": json.dumps(preserved),
                "metric_name": metric_name,
                "goal": goal,
            },
        )
        run = self.find_run(tag)
        assert run is not None
        return run

    def _run_from(self, row: sqlite3.Row | None) -> Run | None:
        if row is None:
            return None
        return Run(
            id=row["id"],
            tag=row["tag"],
            branch=row["branch"],
            source_branch=row["source_branch"],
            base_commit=row["base_commit"],
            config=json.loads(row["config_json"]),
            harness=json.loads(row["harness_json"]),
            preserved=json.loads(row["preserved_json"]),
            metric_name=row["metric_name"],
            goal=row["goal"],
        )

    def find_run(self, tag: str) -> Run | None:
        return self._run_from(self.db.execute("SELECT * FROM runs WHERE tag=?", (tag,)).fetchone())

    def latest_run(self) -> Run | None:
        return self._run_from(self.db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone())

    def runs(self) -> list[Run]:
        return [r for r in map(self._run_from, self.db.execute("SELECT * FROM runs ORDER BY id")) if r]

    # --- experiments -----------------------------------------------------------------------------------

    def mark_pending(self, marker: Pending) -> None:
        """Record that an experiment is about to run, so a kill leaves a trace the resume can settle."""
        payload = {"experiment": _to_columns(marker.experiment, EXPERIMENT_COLUMNS), "pgid": marker.pgid}
        self.db.execute(
            "INSERT OR REPLACE INTO pending (run_id, number, payload, started_at) VALUES (?, ?, ?, ?)",
            (marker.experiment.run_id, marker.number, json.dumps(payload), time.time()),
        )

    def pending(self, run_id: int) -> list[Pending]:
        rows = self.db.execute("SELECT * FROM pending WHERE run_id=? ORDER BY number", (run_id,))
        return [_pending_from(r, run_id) for r in rows]

    def record_experiment(self, experiment: Experiment) -> Experiment:
        """Append a finished experiment and clear its pending marker in the same transaction; return it as
        stored (with `finished_at`)."""
        if experiment.finished_at is None:
            experiment = replace(experiment, finished_at=time.time())
        row = _to_columns(experiment, EXPERIMENT_COLUMNS)
        self._append("experiments", row, delete_pending=(experiment.run_id, experiment.number))
        return experiment

    def experiments(self, run_id: int) -> list[Experiment]:
        rows = self.db.execute("SELECT * FROM experiments WHERE run_id=? ORDER BY number", (run_id,))
        return [_from_columns(Experiment, r) for r in rows]

    def next_number(self, run_id: int) -> int:
        row = self.db.execute(
            "SELECT MAX(n) FROM (SELECT MAX(number) AS n FROM experiments WHERE run_id=? "
            "UNION ALL SELECT MAX(number) FROM pending WHERE run_id=?)",
            (run_id, run_id),
        ).fetchone()
        return (row[0] or 0) + 1

    # --- held-out ---------------------------------------------------------------------------------------

    def record_heldout(self, result: HeldoutResult) -> HeldoutResult:
        """Append a held-out score; return it as stored (with `created_at`)."""
        result = replace(result, created_at=time.time())
        self._append("heldout", _to_columns(result, HELDOUT_COLUMNS))
        return result

    def heldout(self, run_id: int) -> list[HeldoutResult]:
        rows = self.db.execute("SELECT * FROM heldout WHERE run_id=? ORDER BY id", (run_id,))
        return [_from_columns(HeldoutResult, r) for r in rows]

    # --- views -----------------------------------------------------------------------------------------

    def export_tsv(self, path: Path, run_id: int | None = None) -> Path:
        """Write autoresearch's results.tsv (commit, <metric>, memory_gb, status, description) for a run."""
        run = self._run_by_id(run_id) if run_id is not None else self.latest_run()
        if run is None:
            raise ValueError("the journal has no runs yet")
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as f:
            out = csv.writer(f, delimiter="\t", lineterminator="\n")
            out.writerow(["commit", run.metric_name, "memory_gb", "status", "description"])
            for e in self.experiments(run.id):
                metric = f"{e.metric:.6f}" if e.metric is not None else "0.000000"
                memory = f"{(e.peak_rss_mb or 0.0) / 1024:.1f}"
                commit = (e.commit_sha or "-------")[:7]
                out.writerow([commit, metric, memory, e.decision, " ".join(e.description.split())])
        return path

    def _run_by_id(self, run_id: int) -> Run | None:
        return self._run_from(self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone())
