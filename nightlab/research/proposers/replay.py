"""The replay proposer: apply a directory of prepared patches in order, then stop.

Useful for demos, tests and for re-checking a list of known changes against the noise rule. Unified diffs
(`*.patch`, `*.diff`) and search/replace blocks (`*.md`, `*.txt`) are read in name order; an optional first
line `# description: ...` names the change (otherwise the file name does). Its section is `[proposer.replay]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nightlab.errors import NightlabError
from nightlab.research.proposers.base import (
    Outcome,
    PatchFormat,
    PluggableProposer,
    Proposal,
    ProposalContext,
    ProposerSettings,
    register,
)

if TYPE_CHECKING:
    from nightlab.config import NightlabConfig

FORMATS: dict[str, PatchFormat] = {
    ".patch": "unified_diff",
    ".diff": "unified_diff",
    ".md": "search_replace",
    ".txt": "search_replace",
}
_DESCRIPTION = "# description:"


class ReplaySection(ProposerSettings):
    """`[proposer.replay]`: where the patches are."""

    patches: str = "patches"


class ReplayError(NightlabError, ValueError):
    """The patch directory cannot be used; the message names it."""


def read_patch(path: Path) -> Proposal:
    """One patch file as a Proposal (description from its first line or its name)."""
    text = path.read_text(encoding="utf-8")
    first, _, rest = text.partition("\n")
    if first.strip().lower().startswith(_DESCRIPTION):
        description, body = first.strip()[len(_DESCRIPTION) :].strip(), rest
    else:
        description, body = path.stem, text
    return Proposal(
        description=description or path.stem,
        patch=body,
        patch_format=FORMATS[path.suffix.lower()],
        rationale=f"replayed from {path.name}",
    )


@register
class ReplayProposer(PluggableProposer):
    """Proposes the patches of a directory one by one.

    It keeps no state of its own: the next patch is the one after as many as the run has already recorded or
    is running, so a resumed run carries on where it stopped (an interrupted patch counts as done).
    """

    name = "replay"
    settings = ReplaySection

    @classmethod
    def from_config(cls, settings: ReplaySection, workspace: Path, config: NightlabConfig) -> ReplayProposer:
        """`patches` is relative to the workspace root (or absolute, or under `~`)."""
        return cls(workspace / Path(settings.patches).expanduser())

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ReplayError(
                f"replay patch directory {self.directory} does not exist; set [proposer.replay] patches"
            )
        self.files = sorted(
            p for p in self.directory.iterdir() if p.suffix.lower() in FORMATS and p.is_file()
        )
        if not self.files:
            raise ReplayError(f"{self.directory} holds no patches (*.patch, *.diff, *.md or *.txt files)")

    def propose(self, context: ProposalContext) -> Proposal | None:
        done = len(context.history) + len(context.running)
        return read_patch(self.files[done]) if done < len(self.files) else None

    def feedback(self, proposal: Proposal, outcome: Outcome) -> None:
        """Nothing to learn: the list is fixed."""
