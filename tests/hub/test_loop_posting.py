"""A short replay run posting to a real hub: every experiment arrives, failures included; the kept commit's
bundle reaches another clone through `pull`; posts wait in a queue while the hub is unreachable."""

from __future__ import annotations

import socket

import pytest

from nightlab.config import load_config
from nightlab.hub.client import HubClient
from nightlab.hub.poster import HubPoster, join_hub
from nightlab.hub.pull import pull_frontier
from nightlab.hub.records import workspace_record
from nightlab.research.journal import Experiment, Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.proposers.base import Proposal, ProposalContext
from nightlab.research.proposers.hub import HubProposer
from nightlab.research.proposers.replay import ReplayProposer
from nightlab.research.state import LoopState
from nightlab.research.workspace import Workspace
from tests.hub.test_server import _result
from tests.research.loop_workspace import git, make_workspace, replace_block

PATCHES = {
    "01-lr.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR"),
    "02-crash.md": replace_block(
        "def main() -> None:", "def main() -> None:\n    raise SystemExit(3)", description="crash"
    ),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTLAB_CACHE_DIR", str(tmp_path / "cache"))


class Recording(ReplayProposer):
    """The replay proposer, keeping the contexts it was given."""

    def __init__(self, directory):
        super().__init__(directory)
        self.contexts: list[ProposalContext] = []

    def propose(self, context: ProposalContext) -> Proposal | None:
        self.contexts.append(context)
        return super().propose(context)


def _run(root, poster: HubPoster, proposer: Recording | None = None) -> list:
    proposer = proposer or Recording(root.parent / "patches")
    loop = ResearchLoop(
        root, RunOptions(tag="night"), observer=poster, proposer=proposer, elsewhere=poster.elsewhere
    )
    loop.run_loop()
    journal = Journal.for_workspace(root)
    rows = journal.experiments(journal.find_run("night").id)
    journal.close()
    return rows


def _identity(root) -> str:
    return workspace_record(Workspace(root, load_config(root)))["identity"]


def test_every_experiment_is_posted_and_the_keep_travels(hub, tmp_path):
    root = make_workspace(tmp_path, patches=PATCHES)
    elsewhere = _result("f" * 40, None, 0.5, machine="gpu-box", calibration=4.0, metric_name="loss")
    elsewhere["workspace"]["identity"] = _identity(root)
    with HubClient(hub.url, hub.bob) as bob:
        bob.post_result(elsewhere)
    proposer = Recording(root.parent / "patches")
    rows = _run(root, join_hub(root, hub.url, hub.alice), proposer)

    with HubClient(hub.url) as reader:
        posted = reader.results(_identity(root))
    assert [(p["commit"], p["decision"]) for p in posted[1:]] == [(r.commit_sha, r.decision) for r in rows]
    with HubClient(hub.url) as reader:
        [status] = reader.live(_identity(root))
    assert status["tag"] == "night" and status["finished"] and status["running"] == []
    assert "crash" in {p["decision"] for p in posted}
    kept = [r.commit_sha for r in rows if r.decision == "keep" and r.kind != "baseline"]
    assert kept

    # the proposer's brief names the other machine's best (the run's own machine is left out)
    assert [line.split(" (")[0] for line in proposer.contexts[0].elsewhere] == ["test cpu"]
    assert "loss 0.5 (normalised 0.5)" in proposer.contexts[0].elsewhere[0]

    clone = tmp_path / "other"
    git(tmp_path, "clone", "-q", "-b", "main", str(root), str(clone))
    lines = pull_frontier(hub.url, clone, None)
    assert any(f"refs/hub/{kept[-1]}" in line for line in lines)
    assert git(clone, "cat-file", "-t", kept[-1]) == "commit"

    # the fetched commit is tried in the clone's own run as a candidate, under the same rules
    hub_proposer = HubProposer(Workspace(clone, load_config(clone)))
    ResearchLoop(clone, RunOptions(tag="tried"), proposer=hub_proposer).run_loop()
    journal = Journal.for_workspace(clone)
    tried = [e for e in journal.experiments(journal.find_run("tried").id) if e.kind == "candidate"]
    journal.close()
    assert [e.description for e in tried] == [f"hub commit {kept[-1][:12]}"]
    assert tried[0].decision == "keep" and "LEARNING_RATE = 0.05" in tried[0].diff


def _closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def test_an_unreachable_hub_queues_posts_until_it_answers(hub, tmp_path):
    root = make_workspace(tmp_path, patches=PATCHES)
    offline = HubPoster(
        HubClient(_closed_port_url(), hub.alice, timeout=1.0), Workspace(root, load_config(root))
    )
    rows = _run(root, offline)
    assert offline.queue.read_text().count('"result"') == len(rows)

    online = HubPoster(HubClient(hub.url, hub.alice), Workspace(root, load_config(root)))
    online.base = offline.base
    online.flush()
    assert online.queue.read_text() == ""
    with HubClient(hub.url) as reader:
        assert len(reader.results(_identity(root))) == len(rows)


def test_the_heartbeat_follows_the_experiments_and_an_unreachable_hub_costs_nothing(hub, tmp_path):
    root = make_workspace(tmp_path)
    poster = join_hub(root, hub.url, hub.alice)
    poster.started(LoopState(tag="night"), resumed=False)
    poster.phase_started(4, "wider", "train", 10.0)
    poster.phase_started(4, "wider", "evaluate", 10.0)  # the same experiment, not a second one
    poster.phase_started(5, "deeper", "on worker 1", 10.0)
    with HubClient(hub.url) as reader:
        [status] = reader.live(_identity(root))
        assert [(r["number"], r["description"]) for r in status["running"]] == [(4, "wider"), (5, "deeper")]
        wider = Experiment(1, 4, "candidate", decision="discard", description="wider")
        poster.experiment_finished(wider, LoopState(tag="night"))
        [status] = reader.live(_identity(root))
        assert [r["number"] for r in status["running"]] == [5] and not status["finished"]

    gone = join_hub(root, _closed_port_url(), hub.alice)
    gone.started(LoopState(tag="night"), resumed=False)  # neither raises nor waits on each beat
    gone.phase_started(6, "wider", "train", 10.0)
    assert gone.running and gone._heartbeat_failed_at > 0
