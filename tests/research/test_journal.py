"""The journal: hash chain, typed records, pending markers, results.tsv."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import pytest

from nightlab.research.journal import ADDED_COLUMNS, ChainError, Experiment, HeldoutResult, Journal, Pending


def _new_run(tmp_path):
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
    return j, run


def _journal(tmp_path):
    j, run = _new_run(tmp_path)
    for n, (decision, metric) in enumerate([("keep", 1.0), ("discard", 1.2), ("crash", None)], 1):
        j.mark_pending(Pending(Experiment(run.id, n, "candidate")))
        j.record_experiment(
            Experiment(
                run.id,
                n,
                "candidate",
                commit_sha=f"{n:040d}",
                description=f"change\t{n}\nsecond line",
                decision=decision,
                metric=metric,
                peak_rss_mb=2048,
                noise=1,
                started_at=1,
            )
        )
    return j, run


def test_chain_verifies_and_pending_clears(tmp_path):
    j, run = _journal(tmp_path)
    assert j.verify_chain() == 4  # one run row + three experiments
    assert j.pending(run.id) == []
    assert j.next_number(run.id) == 4
    j.mark_pending(Pending(Experiment(run.id, 4, "candidate", description="in flight"), pgid=77))
    (marker,) = j.pending(run.id)
    assert marker.experiment == Experiment(run.id, 4, "candidate", description="in flight")
    assert marker.number == 4 and marker.pgid == 77 and marker.started_at > 0
    assert j.next_number(run.id) == 5


def test_recording_the_same_experiment_twice_is_refused(tmp_path):
    j, run = _journal(tmp_path)
    with pytest.raises(sqlite3.IntegrityError):
        j.record_experiment(Experiment(run.id, 2, "candidate", decision="keep"))
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
    j.record_heldout(HeldoutResult(run.id, "a" * 40, "baseline", validation=1.0, test=1.1))
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
        HeldoutResult(
            run.id,
            "b" * 40,
            "best",
            validation=0.9,
            test=1.0,
            sandboxed=True,
            sandbox_reason="sandboxed by bubblewrap",
        )
    )
    assert [h.sandboxed for h in j.heldout(run.id)] == [None, True] and j.verify_chain() == 6
    raw = sqlite3.connect(tmp_path / "journal.sqlite")
    raw.execute(
        "UPDATE heldout SET sandboxed = 1 WHERE label = 'baseline'"
    )  # claiming the old row ran jailed
    raw.commit()
    with pytest.raises(ChainError, match="heldout row id=1: its content was modified"):
        j.verify_chain()


# Every column set, the JSON ones with dict keys out of order: what the loop records for a confirmed keep.
KEPT = Experiment(
    run_id=1,
    number=1,
    kind="candidate",
    commit_sha="c" * 40,
    parent_commit="a" * 40,
    patch="p",
    patch_format="search_replace",
    diff="d",
    description="lower the LR",
    rationale="why",
    proposer="tune",
    params={"WIDTH": 8, "LR": 0.05},
    metric=1.25,
    metric_runs=[1.5, 1.0],
    extra={"steps": 10.0, "acc": 0.5},
    decision="keep",
    reason="confirmed",
    margin=0.1,
    sigmas=3.0,
    probability=0.99,
    noise=0.03,
    best_before=1.4,
    timings={"train": 2.5, "evaluate": 0.5, "train (confirm 1)": 2.4},
    exit_code=0,
    peak_rss_mb=100.0,
    log_path="/l/0001.log",
    prompt_tokens=10,
    completion_tokens=5,
    cost_usd=0.01,
    sandboxed=True,
    sandbox_reason="sandboxed by bubblewrap",
    started_at=100.0,
    finished_at=200.0,
    train_limit=9.5,
)


def test_an_experiment_comes_back_as_recorded_with_its_json_columns_parsed(tmp_path):
    j, run = _new_run(tmp_path)
    assert j.record_experiment(KEPT) == KEPT
    (back,) = j.experiments(run.id)
    assert back == KEPT and back.params == {"LR": 0.05, "WIDTH": 8} and back.sandboxed is True
    assert list(back.timings) == ["train", "evaluate", "train (confirm 1)"]  # the order the phases ran
    raw = sqlite3.connect(tmp_path / "journal.sqlite")
    row = raw.execute(
        "SELECT params_json, extra_json, timings_json, sandboxed, row_hash FROM experiments"
    ).fetchone()
    assert row[:4] == (
        '{"LR": 0.05, "WIDTH": 8}',
        '{"acc": 0.5, "steps": 10.0}',
        '{"train": 2.5, "evaluate": 0.5, "train (confirm 1)": 2.4}',
        1,
    )
    # The hash nightlab gave this very row when it still wrote row dicts: the stored form did not change.
    assert row[4] == "9895c9daed954bb9145d809e75d3b3cc5f7bc821c428badd1c7da62263c90bf9"
    assert j.verify_chain() == 2


def test_null_columns_read_back_as_the_fields_defaults(tmp_path):
    j, run = _journal(tmp_path)
    j.db.execute(
        "UPDATE experiments SET params_json = NULL, metric_runs_json = NULL, extra_json = NULL, "
        "timings_json = NULL, description = NULL, reason = NULL WHERE number = 3"
    )
    crash = j.experiments(run.id)[2]
    assert (crash.params, crash.metric_runs, crash.extra, crash.timings) == ({}, [], {}, {})
    assert (crash.description, crash.reason, crash.metric, crash.sandboxed) == ("", "", None, None)


def test_a_started_record_round_trips_through_its_pending_marker(tmp_path):
    j, run = _new_run(tmp_path)
    started = Experiment(run.id, 1, "candidate", parent_commit="a" * 40, params={"W": 2.0}, started_at=3.0)
    j.mark_pending(Pending(started))
    j.mark_pending(Pending(started, pgid=42))  # a phase started: same marker, now with its process group
    (marker,) = j.pending(run.id)
    assert marker.experiment == started and marker.pgid == 42
    j.record_experiment(replace(marker.experiment, decision="crash", reason="interrupted"))
    assert j.pending(run.id) == [] and j.experiments(run.id)[0].params == {"W": 2.0}


def test_a_marker_written_by_an_older_nightlab_is_read_as_a_typed_record(tmp_path):
    j, run = _new_run(tmp_path)
    payload = {
        "kind": "candidate",
        "parent": "a" * 40,
        "commit": "c" * 40,
        "patch": "p",
        "patch_format": "search_replace",
        "description": "wider",
        "rationale": "",
        "proposer": "tune",
        "params": {"WIDTH": 8},
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "cost_usd": 0.5},
        "log_path": "/l/0004.log",
        "pgid": 99,
    }
    j.db.execute(
        "INSERT INTO pending (run_id, number, payload, started_at) VALUES (?, ?, ?, ?)",
        (run.id, 4, json.dumps(payload), 7.0),
    )
    (marker,) = j.pending(run.id)
    assert marker == Pending(
        Experiment(
            run.id,
            4,
            "candidate",
            commit_sha="c" * 40,
            parent_commit="a" * 40,
            patch="p",
            patch_format="search_replace",
            description="wider",
            proposer="tune",
            params={"WIDTH": 8},
            log_path="/l/0004.log",
            prompt_tokens=3,
            completion_tokens=2,
            cost_usd=0.5,
        ),
        pgid=99,
        started_at=7.0,
    )
