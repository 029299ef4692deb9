"""The hub over real HTTP: auth, results, normalisation across machines, frontier and children, bundles."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from nightlab.hub.client import HubClient, HubError

IDENTITY = "ab" * 16


def _result(
    commit: str | None,
    parent: str | None,
    metric: float | None,
    decision: str = "keep",
    machine: str = "fast",
    calibration: float = 2.0,
    metric_name: str = "mean_seconds",
) -> dict:
    return {
        "workspace": {"identity": IDENTITY, "name": "speed", "metric": metric_name, "goal": "minimize"},
        "machine": {"id": machine, "accelerator": "test cpu", "memory_gb": 8, "calibration": calibration},
        "commit": commit,
        "parent": parent,
        "description": f"try {commit}",
        "decision": decision,
        "metric": metric,
        "sigmas": 3.0,
        "noise": 0.1,
    }


def test_writes_refused_without_or_with_a_wrong_token(hub):
    with httpx.Client(base_url=hub.url) as anonymous:
        assert anonymous.post("/api/results", json=_result("a" * 40, None, 1.0)).status_code == 401
    with HubClient(hub.url, "not-a-token") as stranger, pytest.raises(HubError, match="403"):
        stranger.post_result(_result("a" * 40, None, 1.0))


def test_token_only_reads_refuse_anonymous_readers(private_hub):
    with HubClient(private_hub.url, private_hub.alice) as alice:
        alice.post_result(_result("a" * 40, None, 1.0))
        assert len(alice.results(IDENTITY)) == 1
    with HubClient(private_hub.url) as anonymous, pytest.raises(HubError, match="401"):
        anonymous.results(IDENTITY)


def test_bad_bodies_and_unknown_workspaces_say_why(clients):
    alice, _ = clients
    with pytest.raises(HubError, match="422"):
        alice.post_result(_result("not-hex", None, 1.0))
    with pytest.raises(HubError, match="404"):
        alice.results("cd" * 16)


def test_a_second_machine_with_another_calibration_is_normalised(clients):
    alice, bob = clients
    alice.post_result(_result("a" * 40, None, 10.0, machine="fast", calibration=2.0))
    bob.post_result(_result("b" * 40, None, 12.0, machine="slow", calibration=1.0))
    bob.post_result(_result("c" * 40, "b" * 40, 30.0, decision="crash", machine="slow", calibration=1.0))

    board = alice.leaderboard(IDENTITY)
    # 10 s on a machine twice the reference's speed is 20 reference seconds: the slow machine's 12 s wins.
    assert [(row["machine"]["id"], row["normalised"]) for row in board] == [("slow", 12.0), ("fast", 20.0)]
    posted = bob.results(IDENTITY)
    assert [row["decision"] for row in posted] == ["keep", "keep", "crash"]
    assert [row["user"] for row in posted] == ["alice", "bob", "bob"]


def test_metrics_that_are_not_times_compare_raw(clients):
    alice, _ = clients
    alice.post_result(_result("a" * 40, None, 1.25, metric_name="val_bpb", calibration=3.0))
    assert alice.results(IDENTITY)[0]["normalised"] == 1.25


def test_frontier_holds_kept_commits_without_a_kept_child(clients):
    alice, bob = clients
    root, kept, discarded = "1" * 40, "2" * 40, "3" * 40
    alice.post_result(_result(root, None, 10.0))
    alice.post_result(_result(kept, root, 9.0))
    bob.post_result(_result(discarded, kept, 11.0, decision="discard"))
    assert [row["commit"] for row in bob.frontier(IDENTITY)] == [kept]
    assert [row["commit"] for row in bob.children(kept)] == [discarded]
    assert [row["commit"] for row in bob.children(root)] == [kept]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _repo(path: Path) -> str:
    path.mkdir()
    _git(path, "init", "-q", "-b", "main")
    _git(path, "config", "user.email", "t@example.com")
    _git(path, "config", "user.name", "t")
    (path / "train.py").write_text("x = 1\n")
    _git(path, "add", ".")
    _git(path, "commit", "-qm", "base")
    return _git(path, "rev-parse", "HEAD")


def test_a_bundle_round_trips_into_another_clone(clients, tmp_path):
    alice, bob = clients
    base = _repo(tmp_path / "alice")
    clone = tmp_path / "bob"
    _git(tmp_path, "clone", "-q", str(tmp_path / "alice"), str(clone))
    (tmp_path / "alice" / "train.py").write_text("x = 2\n")
    _git(tmp_path / "alice", "commit", "-qam", "better")
    commit = _git(tmp_path / "alice", "rev-parse", "HEAD")
    bundle = tmp_path / "kept.bundle"
    _git(tmp_path / "alice", "bundle", "create", str(bundle), f"{base}..HEAD")

    alice.push_bundle(commit, bundle.read_bytes())
    (tmp_path / "fetched.bundle").write_bytes(bob.fetch_bundle(commit))
    _git(clone, "fetch", "-q", str(tmp_path / "fetched.bundle"), f"HEAD:refs/hub/{commit}")
    assert _git(clone, "cat-file", "-t", commit) == "commit"
    assert _git(clone, "show", f"{commit}:train.py") == "x = 2"


def test_bundles_are_checked_and_size_limited(clients):
    alice, _ = clients
    with pytest.raises(HubError, match="422"):
        alice.push_bundle("a" * 40, b"not a bundle")
    with pytest.raises(HubError, match="413"):
        alice.push_bundle("a" * 40, b"# v2 git bundle\n" + b"x" * 100_000)
    with pytest.raises(HubError, match="404"):
        alice.fetch_bundle("b" * 40)
