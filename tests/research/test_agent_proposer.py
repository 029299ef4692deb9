"""The agent proposer runs a command in a scratch copy and proposes the diff of the editable files."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab.research.proposers.agent import AgentError, AgentProposer, AgentSection, render_brief
from nightlab.research.proposers.base import ProposalContext
from tests.research.loop_workspace import make_workspace


def _context(program: str = "make loss small") -> ProposalContext:
    return ProposalContext(program, {}, "loss", "minimize", 1.0, 0.1, [], last_invalid_reason="bad diff")


def _proposer(root: Path, command: str, timeout: float = 60.0, **jail: object) -> AgentProposer:
    """The proposer unjailed unless `jail` says otherwise (`sandbox`, `hidden`; see the jail test)."""
    settings = AgentSection(command=command, timeout_seconds=timeout, network=bool(jail.pop("network", True)))
    return AgentProposer(settings, root, ["train.py"], **({"sandbox": "off"} | jail))


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
    brief = render_brief(_context(), ["train.py"], "- #1 keep 0.5: halve the LR")
    assert "make loss small" in brief and "minimize `loss`" in brief and "bad diff" in brief
    assert "Edit only these files: train.py" in brief and "## History\n- #1 keep 0.5: halve the LR" in brief
    assert "Running now" not in brief and "other machines" not in brief


def test_the_brief_names_running_candidates_and_what_worked_elsewhere() -> None:
    context = _context()
    context.running, context.elsewhere = ["wider MLP"], ["H100: loss 0.9 with commit abc: deeper"]
    brief = render_brief(context, ["train.py"], "")
    assert "## Running now on other workers\n- wider MLP" in brief
    assert "## What worked on other machines (same workspace, normalised)\nH100: loss 0.9" in brief


def test_a_command_is_required(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="command is required"):
        AgentProposer(AgentSection(), tmp_path, ["train.py"])


def test_in_its_jail_the_agent_sees_neither_the_workspace_nor_hidden_data_and_writes_only_its_copy(
    tmp_path: Path,
) -> None:
    from nightlab.research.sandbox import detect

    if not detect().available:
        pytest.skip(f"no jail here: {detect().reason}")
    root = make_workspace(tmp_path)
    (root / ".nightlab").mkdir(exist_ok=True)
    (root / ".nightlab" / "journal.sqlite").write_text("secret journal")
    split = tmp_path / "data" / "test.bin"
    split.parent.mkdir()
    split.write_text("secret split")
    outside = tmp_path / "planted.txt"
    probes = (
        f"cat {root}/.nightlab/journal.sqlite > journal.txt 2>&1; cat {split} > split.txt 2>&1; "
        f"echo x > {outside} 2>/dev/null; echo $? > write.txt; "
        "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), 2)' 2> net.txt; "
        "cat journal.txt split.txt write.txt net.txt; echo '# probed' >> train.py"
    )
    agent = _proposer(root, probes, sandbox="required", hidden=[split.parent], network=False)
    proposal = agent.propose(_context())
    assert proposal is not None and "+# probed" in proposal.patch
    transcript = proposal.rationale
    assert transcript.startswith("[agent jailed]")
    assert "secret" not in transcript and not outside.exists()
    assert "Network is unreachable" in transcript or "network" in transcript.lower()
