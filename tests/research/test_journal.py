"""The journal: hash chain, pending markers, results.tsv."""

from __future__ import annotations

import sqlite3

import pytest

from nightlab.research.journal import ADDED_COLUMNS, ChainError, Journal


def _journal(tmp_path):
    j = Journal(tmp_path / "journal.sqlite")
    run = j.create_run(
        tag="t",
        branch="nightlab/t",
        source_branch="main",
        base_commit="a" * 40,
        config={"x": 1},
        harness={"prepare.py": "00"},
        preserved=[],
        metric_name="val_bpb",
        goal="minimize",
    )
    for n, (decision, metric) in enumerate([("keep", 1.0), ("discard", 1.2), ("crash", None)], 1):
        j.mark_pending(run.id, n, {"kind": "candidate"})
        j.record_experiment(
            {
                "run_id": run.id,
                "number": n,
                "kind": "candidate",
                "commit_sha": f"{n:040d}",
                "description": f"change\t{n}\nsecond line",
                "decision": decision,
                "metric": metric,
                "peak_rss_mb": 2048,
                "noise": 1,
                "started_at": 1,
            }
        )
    return j, run


def test_chain_verifies_and_pending_clears(tmp_path):
    j, run = _journal(tmp_path)
    assert j.verify_chain() == 4  # one run row + three experiments
    assert j.pending(run.id) == []
    assert j.next_number(run.id) == 4
    j.mark_pending(run.id, 4, {"kind": "candidate", "description": "in flight"})
    assert j.pending(run.id)[0]["description"] == "in flight"
    assert j.next_number(run.id) == 5


def test_recording_the_same_experiment_twice_is_refused(tmp_path):
    j, run = _journal(tmp_path)
    with pytest.raises(sqlite3.IntegrityError):
        j.record_experiment({"run_id": run.id, "number": 2, "kind": "candidate", "decision": "keep"})
    assert j.verify_chain() == 4


def test_edited_row_is_named(tmp_path):
    j, _ = _journal(tmp_path)
    raw = sqlite3.connect(tmp_path / "journal.sqlite")
    raw.execute("UPDATE experiments SET metric = 0.5 WHERE number = 2")
    raw.commit()
    with pytest.raises(
        ChainError, match=r"experiments row id=2 \(run 1, experiment 2\): its content was modified"
    ):
        j.verify_chain()


def test_deleted_row_breaks_the_chain_at_its_successor(tmp_path):
    j, _ = _journal(tmp_path)
    raw = sqlite3.connect(tmp_path / "journal.sqlite")
    raw.execute("DELETE FROM experiments WHERE number = 2")
    raw.commit()
    with pytest.raises(ChainError, match="experiment 3\\): a row before it was removed"):
        j.verify_chain()


def test_results_tsv_has_autoresearch_columns(tmp_path):
    j, run = _journal(tmp_path)
    path = j.export_tsv(tmp_path / "results.tsv", run.id)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert lines[1].split("\t") == ["0000000", "1.000000", "2.0", "keep", "change 1 second line"]
    assert lines[3].split("\t")[1:4] == ["0.000000", "2.0", "crash"]
    assert all(len(line.split("\t")) == 5 for line in lines)


def test_a_journal_from_before_the_added_columns_still_verifies_and_gains_them(tmp_path):
    j, run = _journal(tmp_path)
    j.record_heldout(
        {"run_id": run.id, "commit_sha": "a" * 40, "label": "baseline", "validation": 1.0, "test": 1.1}
    )
    j.close()
    raw = sqlite3.connect(tmp_path / "journal.sqlite")  # back to the schema of an older nightlab
    for table, columns in ADDED_COLUMNS.items():
        for column in columns:
            raw.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    raw.commit()
    raw.close()
    j = Journal(tmp_path / "journal.sqlite")
    assert j.verify_chain() == 5
    j.record_heldout(
        {
            "run_id": run.id,
            "commit_sha": "b" * 40,
            "label": "best",
            "validation": 0.9,
            "test": 1.0,
            "sandboxed": 1,
            "sandbox_reason": "sandboxed by bubblewrap",
        }
    )
    assert [h["sandboxed"] for h in j.heldout(run.id)] == [None, 1] and j.verify_chain() == 6
    raw = sqlite3.connect(tmp_path / "journal.sqlite")
    raw.execute(
        "UPDATE heldout SET sandboxed = 1 WHERE label = 'baseline'"
    )  # claiming the old row ran jailed
    raw.commit()
    with pytest.raises(ChainError, match="heldout row id=1: its content was modified"):
        j.verify_chain()
