"""The agent proposer runs a command in a scratch copy and proposes the diff of the editable files."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab.research.proposers.agent import AgentError, AgentProposer, AgentSection, render_brief
from nightlab.research.proposers.base import ProposalContext
from tests.research.loop_workspace import make_workspace


def _context(program: str = "make loss small") -> ProposalContext:
    return ProposalContext(program, {}, "loss", "minimize", 1.0, 0.1, [], last_invalid_reason="bad diff")


def _proposer(root: Path, command: str, timeout: float = 60.0) -> AgentProposer:
    return AgentProposer(AgentSection(command=command, timeout_seconds=timeout), root, ["train.py"])


def _train_text(root: Path) -> str:
    return (root / "train.py").read_text()


def test_a_good_edit_becomes_a_unified_diff_of_the_editable_file(tmp_path: Path) -> None:
    root = make_workspace(tmp_path)
    before = _train_text(root)
    command = "cat > seen.txt; echo '# tuned' >> train.py; echo 'add a comment' > .nightlab-proposal.md"
    proposal = _proposer(root, command).propose(_context())
    assert proposal is not None and proposal.patch_format == "unified_diff"
    assert proposal.description == "add a comment"
    assert (
        "+# tuned" in proposal.patch and "b/train.py" in proposal.patch and "seen.txt" not in proposal.patch
    )
    assert _train_text(root) == before


def test_a_harness_edit_is_refused_and_never_reaches_the_workspace(tmp_path: Path) -> None:
    root = make_workspace(tmp_path)
    harness = (root / "evaluate.py").read_text()
    proposal = _proposer(root, "echo 'x = 1' >> evaluate.py; echo '# t' >> train.py").propose(_context())
    assert proposal is not None and proposal.patch == ""
    assert "evaluate.py" in proposal.description and "refused" in proposal.description
    assert (root / "evaluate.py").read_text() == harness


def test_a_hanging_agent_is_killed_at_the_timeout(tmp_path: Path) -> None:
    root = make_workspace(tmp_path)
    marker = tmp_path / "pid"
    proposal = _proposer(root, f"echo $$ > {marker}; sleep 600", timeout=1).propose(_context())
    assert proposal is not None and proposal.patch == "" and "timed out" in proposal.description
    assert not Path(f"/proc/{marker.read_text().strip()}").exists()


def test_deleting_everything_leaves_the_workspace_untouched(tmp_path: Path) -> None:
    root = make_workspace(tmp_path)
    before = _train_text(root)
    proposal = _proposer(root, "rm -rf ./* ./.[!.]*").propose(_context())
    assert proposal is not None and proposal.patch == ""
    assert _train_text(root) == before


def test_the_brief_carries_program_goal_rejection_and_rules() -> None:
    brief = render_brief(_context(), ["train.py"])
    assert "make loss small" in brief and "minimize `loss`" in brief and "bad diff" in brief
    assert "Edit only these files: train.py" in brief


def test_a_command_is_required(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="command is required"):
        AgentProposer(AgentSection(), tmp_path, ["train.py"])
