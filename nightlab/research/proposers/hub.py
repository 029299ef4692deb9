"""Tries the commits other machines kept: each `refs/hub/<sha>` that `nightlab hub pull` fetched becomes a
candidate, a diff from the run's best to that commit's editable files, so it goes through the same
validation and noise rule as any other proposal. No network: the pull is a separate, explicit step."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nightlab.config import NightlabConfig
from nightlab.research.edits import unified_diff
from nightlab.research.proposers.base import (
    Outcome,
    PluggableProposer,
    Proposal,
    ProposalContext,
    ProposerSettings,
    register,
)
from nightlab.research.workspace import Workspace

HUB_REFS = "refs/hub/"


@register
class HubProposer(PluggableProposer):
    name = "hub"
    settings = ProposerSettings

    @classmethod
    def from_config(cls, settings: ProposerSettings, workspace: Path, config: NightlabConfig) -> HubProposer:
        return cls(Workspace(workspace, config))

    def __init__(self, workspace: Workspace):
        self.workspace = workspace

    def _fetched(self) -> list[str]:
        """The fetched hub commits, oldest first, so a resumed run meets them in the same order."""
        out = self.workspace.git("for-each-ref", "--sort=committerdate", "--format=%(objectname)", HUB_REFS)
        return [line for line in out.splitlines() if line]

    def _files_at(self, commit: str) -> dict[str, str]:
        """Editable files at `commit`, byte for byte (trailing newlines included, unlike `git()`'s output)."""
        return {
            rel: subprocess.run(
                ["git", "show", f"{commit}:{rel}"], cwd=self.workspace.root, capture_output=True, text=True
            ).stdout
            for rel in self.workspace.editable_at(commit)
        }

    def propose(self, context: ProposalContext) -> Proposal | None:
        """The next fetched commit not tried yet in this run and different from the best; None when done."""
        tried = {past.description for past in context.history}
        for commit in self._fetched():
            description = f"hub commit {commit[:12]}"
            patch = unified_diff(context.files, self._files_at(commit))
            if description in tried or not patch:
                continue
            return Proposal(description, patch, "unified_diff", rationale="kept on another machine")
        return None

    def feedback(self, proposal: Proposal, outcome: Outcome) -> None:
        """Nothing to learn: each fetched commit is tried once."""
