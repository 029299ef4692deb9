"""The journal: an append-only, hash-chained SQLite record of every run and experiment.

It is the source of truth; results.tsv, plots and reports are views derived from it. Each row stores the
sha256 of its own canonical content plus the previous row's hash, so an edited, inserted or deleted row breaks
the chain and `verify_chain` names it. The only mutable table is `pending`: the marker of the experiment in
flight, which lets a killed run resume without losing or duplicating an experiment.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_DIR = ".nightlab"
JOURNAL_NAME = "journal.sqlite"
GENESIS = "0" * 64

# Column lists double as the canonical order that row hashes are computed over.
RUN_COLUMNS = [
    "tag", "branch", "source_branch", "base_commit", "created_at", "config_json", "harness_json",
    "preserved_json", "metric_name", "goal",
]
EXPERIMENT_COLUMNS = [
    "run_id", "number", "kind", "commit_sha", "parent_commit", "patch", "patch_format", "diff", "description", "rationale", "proposer",
    "params_json", "metric", "metric_runs_json", "extra_json", "decision", "reason", "margin", "sigmas",
    "probability", "noise", "best_before", "timings_json", "exit_code", "peak_rss_mb", "log_path",
    "prompt_tokens", "completion_tokens", "cost_usd", "sandboxed", "started_at", "finished_at",
]
HELDOUT_COLUMNS = [
    "run_id", "commit_sha", "label", "validation", "test", "extra_json", "log_path", "created_at",
]
CHAINED = {"runs": RUN_COLUMNS, "experiments": EXPERIMENT_COLUMNS, "heldout": HELDOUT_COLUMNS}

_TYPES = {
    "run_id": "INTEGER", "number": "INTEGER", "exit_code": "INTEGER", "prompt_tokens": "INTEGER",
    "completion_tokens": "INTEGER", "sandboxed": "INTEGER", "metric": "REAL", "margin": "REAL",
    "sigmas": "REAL", "probability": "REAL", "noise": "REAL", "best_before": "REAL", "peak_rss_mb": "REAL",
    "cost_usd": "REAL", "created_at": "REAL", "started_at": "REAL", "finished_at": "REAL",
    "validation": "REAL", "test": "REAL",
}


class ChainError(RuntimeError):
    """The journal's hash chain is broken: a row was edited, inserted or removed outside nightlab."""


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


def _canonical_hash(columns: list[str], row: dict[str, Any], prev_hash: str) -> str:
    content = {c: row.get(c) for c in columns}
    content["prev_hash"] = prev_hash
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
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


class Journal:
    """Thin access layer over the SQLite file; every write is one transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self._create()

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

    # --- chained inserts -------------------------------------------------------------------------------

    def _append(self, table: str, row: dict[str, Any], *, delete_pending: tuple[int, int] | None = None) -> int:
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
            values["row_hash"] = _canonical_hash(columns, values, prev)
            names = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            cur = self.db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", list(values.values()))
            if delete_pending:
                self.db.execute("DELETE FROM pending WHERE run_id=? AND number=?", delete_pending)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return int(cur.lastrowid)

    def verify_chain(self) -> int:
        """Re-hash every chained row in order; raise ChainError naming the first bad one. Returns rows checked."""
        checked = 0
        for table, columns in CHAINED.items():
            prev = GENESIS
            for row in self.db.execute(f"SELECT * FROM {table} ORDER BY id"):
                data = dict(row)
                where = f"{table} row id={data['id']}"
                if table == "experiments":
                    where += f" (run {data['run_id']}, experiment {data['number']})"
                if data["prev_hash"] != prev:
                    raise ChainError(f"journal chain broken at {where}: a row before it was removed or inserted")
                if _canonical_hash(columns, data, prev) != data["row_hash"]:
                    raise ChainError(f"journal chain broken at {where}: its content was modified")
                prev = data["row_hash"]
                checked += 1
        return checked

    # --- runs ------------------------------------------------------------------------------------------

    def create_run(
        self, *, tag: str, branch: str, source_branch: str, base_commit: str, config: dict[str, Any],
        harness: dict[str, str], preserved: list[str], metric_name: str, goal: str,
    ) -> Run:
        self._append("runs", {
            "tag": tag, "branch": branch, "source_branch": source_branch, "base_commit": base_commit,
            "created_at": time.time(), "config_json": json.dumps(config, sort_keys=True),
            "harness_json": json.dumps(harness, sort_keys=True), "preserved_json": json.dumps(preserved),
            "metric_name": metric_name, "goal": goal,
        })
        run = self.find_run(tag)
        assert run is not None
        return run

    def _run_from(self, row: sqlite3.Row | None) -> Run | None:
        if row is None:
            return None
        return Run(
            id=row["id"], tag=row["tag"], branch=row["branch"], source_branch=row["source_branch"],
            base_commit=row["base_commit"], config=json.loads(row["config_json"]),
            harness=json.loads(row["harness_json"]), preserved=json.loads(row["preserved_json"]),
            metric_name=row["metric_name"], goal=row["goal"],
        )

    def find_run(self, tag: str) -> Run | None:
        return self._run_from(self.db.execute("SELECT * FROM runs WHERE tag=?", (tag,)).fetchone())

    def latest_run(self) -> Run | None:
        return self._run_from(self.db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone())

    def runs(self) -> list[Run]:
        return [r for r in map(self._run_from, self.db.execute("SELECT * FROM runs ORDER BY id")) if r]

    # --- experiments -----------------------------------------------------------------------------------

    def mark_pending(self, run_id: int, number: int, payload: dict[str, Any]) -> None:
        """Record that an experiment is about to run, so a kill leaves a trace the resume can settle."""
        self.db.execute(
            "INSERT OR REPLACE INTO pending (run_id, number, payload, started_at) VALUES (?, ?, ?, ?)",
            (run_id, number, json.dumps(payload), time.time()),
        )

    def pending(self, run_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM pending WHERE run_id=? ORDER BY number", (run_id,)).fetchall()
        return [{"number": r["number"], "started_at": r["started_at"], **json.loads(r["payload"])} for r in rows]

    def record_experiment(self, row: dict[str, Any]) -> int:
        """Append a finished experiment and clear its pending marker in the same transaction."""
        row = {**row, "finished_at": row.get("finished_at") or time.time()}
        return self._append("experiments", row, delete_pending=(row["run_id"], row["number"]))

    def experiments(self, run_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM experiments WHERE run_id=? ORDER BY number", (run_id,))
        return [dict(r) for r in rows]

    def next_number(self, run_id: int) -> int:
        row = self.db.execute(
            "SELECT MAX(n) FROM (SELECT MAX(number) AS n FROM experiments WHERE run_id=? "
            "UNION ALL SELECT MAX(number) FROM pending WHERE run_id=?)", (run_id, run_id)
        ).fetchone()
        return (row[0] or 0) + 1

    # --- held-out ---------------------------------------------------------------------------------------

    def record_heldout(self, row: dict[str, Any]) -> int:
        return self._append("heldout", {**row, "created_at": time.time()})

    def heldout(self, run_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM heldout WHERE run_id=? ORDER BY id", (run_id,))
        return [dict(r) for r in rows]

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
                metric = f"{e['metric']:.6f}" if e["metric"] is not None else "0.000000"
                memory = f"{(e['peak_rss_mb'] or 0.0) / 1024:.1f}"
                commit = (e["commit_sha"] or "-------")[:7]
                description = " ".join((e["description"] or "").split())
                out.writerow([commit, metric, memory, e["decision"], description])
        return path

    def _run_by_id(self, run_id: int) -> Run | None:
        return self._run_from(self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone())
