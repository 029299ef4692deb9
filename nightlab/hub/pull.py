"""`nightlab hub pull`: this workspace's results from every machine, and the frontier's commits as refs."""

from __future__ import annotations

from pathlib import Path

from nightlab.config import load_config
from nightlab.hub.bundles import import_bundle
from nightlab.hub.client import HubClient, HubError
from nightlab.hub.records import workspace_record
from nightlab.research.workspace import Workspace


def _line(row: dict) -> str:
    machine = row["machine"]
    return (
        f"{(row['commit'] or '-')[:10]} {row['decision']:8} metric={row['metric']} "
        f"normalised={row['normalised']} on {machine['accelerator']} (calibration {machine['calibration']}) "
        f"by {row['user']}: {row['description']}"
    )


def pull_frontier(url: str, root: Path, token: str | None) -> list[str]:
    """Lines describing every result for this workspace's identity; each frontier commit with a bundle is
    fetched as refs/hub/<sha>, ready to check out or try."""
    workspace = Workspace(root, load_config(root))
    identity = workspace_record(workspace)["identity"]
    with HubClient(url, token) as client:
        lines = [_line(row) for row in client.results(identity)]
        for row in client.frontier(identity):
            try:
                ref = import_bundle(root, row["commit"], client.fetch_bundle(row["commit"]))
            except HubError as exc:
                lines.append(f"frontier {row['commit'][:10]}: no bundle ({exc})")
                continue
            lines.append(f"frontier {row['commit'][:10]} fetched as {ref}")
    return lines
