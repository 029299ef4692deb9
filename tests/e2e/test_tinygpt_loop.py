"""`nightlab run` on the tinygpt template end to end: setup, baselines, tuned experiments and the held-out
score, sandboxed where bubblewrap works, on a tiny model and corpus so it takes about a minute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nightlab.research.journal import Journal
from nightlab.research.workspace import init_workspace
from tests.templates.tinygpt_support import TINY, VOCAB, write_corpus

TINY_ENV = {k: v for k, v in TINY.items() if k.startswith("TINYGPT_")}


def _nightlab(ws: Path, *args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYGPT_", "NIGHTLAB_"))}
    env["NIGHTLAB_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "nightlab.cli", *args],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinygpt_loop")
    corpus = root / "corpus"
    write_corpus(corpus)
    ws = init_workspace("tinygpt", root / "ws")
    toml = (ws / "nightlab.toml").read_text()
    settings = {**TINY_ENV, "TINYGPT_DATA": str(corpus), "TINYGPT_VOCAB_SIZE": str(VOCAB)}
    env_table = ", ".join(f'{k} = "{v}"' for k, v in settings.items())
    toml = toml.replace("[metric]", f"env = {{ {env_table} }}\n\n[metric]", 1)
    # The raw corpus holds every split, so only setup may read it; the rest find the prepared data through the
    # pointer setup leaves in the cache.
    toml = toml.replace(
        'read_only = ["${NIGHTLAB_CACHE_DIR}/tinygpt"',
        f'setup_read_only = ["{corpus}"]\nread_only = ["${{NIGHTLAB_CACHE_DIR}}/tinygpt"',
        1,
    )
    (ws / "nightlab.toml").write_text(toml)
    subprocess.run(["git", "commit", "-qam", "tiny settings for the test"], cwd=ws, check=True)
    result = _nightlab(ws, "run", "--max-experiments", "2", "--budget", "2", cache=root / "cache")
    return ws, root / "cache", result


def test_the_loop_runs_tinygpt_end_to_end(finished_run):
    ws, _, result = finished_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    journal = Journal.for_workspace(ws)
    try:
        journal.verify_chain()
        run = journal.latest_run()
        rows = journal.experiments(run.id)
        heldout = journal.heldout(run.id)
    finally:
        journal.close()
    baselines = [r for r in rows if r.kind == "baseline"]
    candidates = [r for r in rows if r.kind == "candidate"]
    assert len(baselines) == 2 and all(r.metric and 0 < r.metric < 20 for r in baselines)
    assert len(candidates) == 2
    assert all(r.decision in {"keep", "discard", "crash", "overrun"} for r in candidates)
    assert all(r.reason or r.decision == "keep" for r in candidates)
    measured = [r for r in candidates if r.decision in {"keep", "discard"}]
    assert measured and all(r.metric and 0 < r.metric < 20 for r in measured), [
        (r.decision, r.reason) for r in candidates
    ]
    assert {h.validation is not None and h.test is not None for h in heldout} == {True}


def test_the_harness_and_the_users_branch_are_untouched(finished_run):
    ws, _, _ = finished_run
    log = subprocess.run(["git", "log", "--format=%s", "main"], cwd=ws, capture_output=True, text=True).stdout
    assert log.splitlines()[0] == "tiny settings for the test"
    changed = subprocess.run(
        ["git", "diff", "--name-only", "main", "HEAD"], cwd=ws, capture_output=True, text=True
    ).stdout.split()
    assert set(changed) <= {"train.py"}


def test_status_and_report_read_the_run(finished_run):
    ws, cache, _ = finished_run
    status = _nightlab(ws, "status", cache=cache)
    assert status.returncode == 0 and "val_bpb" in status.stdout
    report = _nightlab(ws, "report", cache=cache)
    assert report.returncode == 0, report.stderr
    out = next((ws / ".nightlab" / "reports").iterdir())
    assert (out / "progress.png").stat().st_size > 0
    header = (out / "results.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["commit", "val_bpb", "memory_gb", "status", "description"]
