"""The loop's link to a hub: every recorded experiment is posted, every kept commit pushed as a bundle, and
a heartbeat says what the run is running now.

The hub must never stop the loop: posts wait in a queue file in the journal dir, are sent in order after each
experiment with a short timeout, and stay queued (with one warning) while the hub cannot be reached. A
heartbeat is only news: it is sent when an experiment starts or ends, never queued, and skipped for a while
after the hub failed to take one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from nightlab.config import load_config
from nightlab.hub.bundles import BundleError, make_bundle
from nightlab.hub.calibration import calibrate
from nightlab.hub.client import HubClient, HubError
from nightlab.hub.records import machine_record, result_record, workspace_record
from nightlab.research.journal import STATE_DIR, Experiment, Journal
from nightlab.research.live import SilentView
from nightlab.research.state import LoopState
from nightlab.research.workspace import Workspace

QUEUE_NAME = "hub_queue.jsonl"
ELSEWHERE_REFRESH_SECONDS = 300.0  # the proposer's view of other machines may lag; each ask is a round trip
HEARTBEAT_BACKOFF_SECONDS = 60.0  # after a failed heartbeat, none is tried for this long
log = logging.getLogger(__name__)


class HubPoster(SilentView):
    """An observer of the loop that posts to `client`; `workspace` gives the identity and the bundles."""

    def __init__(self, client: HubClient, workspace: Workspace, cache: Path | None = None) -> None:
        self.client = client
        self.workspace = workspace
        self.queue = workspace.root / STATE_DIR / QUEUE_NAME
        self.workspace_fields = workspace_record(workspace)
        self.machine_fields = machine_record(calibrate(cache))
        self.base: str | None = None
        self._warned = False
        self._elsewhere: list[str] = []
        self._elsewhere_at = -float("inf")
        self.tag = ""
        self.running: dict[int, dict[str, Any]] = {}  # number -> what the heartbeat says of it
        self._heartbeat_failed_at = -float("inf")

    def started(self, state: LoopState, resumed: bool) -> None:
        run = Journal.for_workspace(self.workspace.root).find_run(state.tag)
        self.base = run.base_commit if run else None
        self.tag = state.tag
        self.flush()
        self._heartbeat()

    def phase_started(self, number: int | str, description: str, phase: str, limit: float) -> None:
        if isinstance(number, int) and number not in self.running:
            what = description[:2000]
            self.running[number] = {"number": number, "description": what, "started_at": time.time()}
            self._heartbeat()

    def finished(self, state: LoopState) -> None:
        self.running.clear()
        self._heartbeat(finished=True)

    def _heartbeat(self, finished: bool = False) -> None:
        """Tell the hub what runs now; a failure only pauses the heartbeats (the queue is the record)."""
        if not self.tag or time.monotonic() - self._heartbeat_failed_at < HEARTBEAT_BACKOFF_SECONDS:
            return
        beat = {
            "workspace": self.workspace_fields,
            "machine": self.machine_fields,
            "tag": self.tag,
            "budget_seconds": self.workspace.config.experiment.budget_seconds,
            "running": sorted(self.running.values(), key=lambda r: r["number"]),
            "finished": finished,
        }
        try:
            self.client.post_live(beat)
        except (httpx.TransportError, HubError) as exc:
            log.debug("hub heartbeat not taken: %s", exc)
            self._heartbeat_failed_at = time.monotonic()

    def experiment_finished(self, experiment: Experiment, state: LoopState) -> None:
        self.running.pop(experiment.number, None)
        items: list[dict[str, Any]] = [
            {"result": result_record(experiment, self.workspace_fields, self.machine_fields)}
        ]
        if experiment.decision == "keep" and experiment.kind != "baseline" and experiment.commit_sha:
            items.append({"bundle": experiment.commit_sha, "base": self.base})
        self._enqueue(items)
        self.flush()
        self._heartbeat()

    def elsewhere(self) -> list[str]:
        """Each other machine's best kept result on this workspace, normalised, as lines for the proposer's
        brief. An unreachable hub gives the last lines known (none at first) instead of an error."""
        if time.monotonic() - self._elsewhere_at < ELSEWHERE_REFRESH_SECONDS:
            return self._elsewhere
        try:
            board = self.client.leaderboard(self.workspace_fields["identity"])
        except (httpx.TransportError, HubError):
            return self._elsewhere
        self._elsewhere_at = time.monotonic()
        self._elsewhere = [
            f"{row['machine']['accelerator']} (calibration {row['machine']['calibration']:.3g}): "
            f"{self.workspace_fields['metric']} {row['metric']:.6g} (normalised {row['normalised']:.6g}) "
            f"with commit {row['commit'][:10]}: {row['description']}"
            for row in board
            if row["machine"]["id"] != self.machine_fields["id"]
        ]
        return self._elsewhere

    def _enqueue(self, items: list[dict[str, Any]]) -> None:
        self.queue.parent.mkdir(parents=True, exist_ok=True)
        with self.queue.open("a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(item) + "\n" for item in items)

    def _send(self, item: dict[str, Any]) -> None:
        if "result" in item:
            self.client.post_result(item["result"])
        elif item["base"]:
            commit = item["bundle"]
            self.client.push_bundle(commit, make_bundle(self.workspace.root, commit, item["base"]))

    def flush(self) -> None:
        """Send what is queued, oldest first; stop at the first unreachable moment and keep the rest."""
        if not self.queue.exists():
            return
        items = [json.loads(line) for line in self.queue.read_text(encoding="utf-8").splitlines() if line]
        sent = 0
        for item in items:
            try:
                self._send(item)
            except httpx.TransportError as exc:
                if not self._warned:
                    log.warning("hub %s unreachable (%s); posts wait in %s", self.client.url, exc, self.queue)
                    self._warned = True
                break
            except (HubError, BundleError) as exc:
                log.warning("hub refused a post, dropped: %s", exc)  # a refusal would repeat forever
            sent += 1
        else:
            self._warned = False
        rest = items[sent:]
        self.queue.write_text("".join(json.dumps(item) + "\n" for item in rest), encoding="utf-8")


def join_hub(root: Path, url: str | None, token: str | None) -> HubPoster | None:
    """A poster to the hub at `url` (the option, else `[hub] url` in nightlab.toml); None without one."""
    url = url or load_config(root).hub.url
    if not url:
        return None
    return HubPoster(HubClient(url, token, timeout=5.0), Workspace(root, load_config(root)))
