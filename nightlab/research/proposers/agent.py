"""The `agent` proposer: bring your own coding agent (`claude -p`, `codex exec`, `aider --message`, a script).

The agent works in a scratch copy of the workspace at the best commit, reads a brief (a file and stdin),
edits files, and the proposal is the unified diff of the editable files it leaves. Edits outside the
editable set (a harness file changed or deleted) are never run: such a proposal is refused (an empty
patch with the reason), so the loop records it as invalid. A hang is killed at `timeout_seconds` with its
whole process group and recorded the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from nightlab.errors import NightlabError
from nightlab.harness import worker_jail
from nightlab.research.edits import is_editable, unified_diff
from nightlab.research.memory import render_memory, token_counter
from nightlab.research.memory_notes import LessonWriter
from nightlab.research.proposers.base import (
    Outcome,
    PluggableProposer,
    Proposal,
    ProposalContext,
    ProposerSettings,
    register,
    running_note,
)
from nightlab.research.proposers.llm import LLMProposer, LLMSection, configured_model
from nightlab.research.sandbox import resolve_mode

if TYPE_CHECKING:
    from nightlab.config import NightlabConfig

BRIEF_FILE = ".nightlab-brief.md"
DESCRIPTION_FILE = ".nightlab-proposal.md"
TRANSCRIPT_LIMIT = 200_000


class AgentSection(ProposerSettings):
    """`[proposer.agent]`: the command line, how long it may take, and what it may reach."""

    command: str = ""
    timeout_seconds: float = 900.0
    pass_env: list[str] = []
    network: bool = Field(
        True, description="the agent reaches its model over the network; false for a local one"
    )


class AgentError(NightlabError, ValueError):
    """The agent proposer is not configured."""


def render_brief(context: ProposalContext, editable: list[str], history: str) -> str:
    """What the agent is told: instructions, goal, results so far, last rejection, and the rules."""
    parts = [
        "# Experiment brief\n",
        context.program.strip(),
        f"\n## Goal\n{context.goal} `{context.metric_name}`; best so far {context.best_metric}, "
        f"noise {context.noise}.",
        f"\n## History\n{history}",
    ]
    if context.last_invalid_reason:
        parts.append(f"\n## Last proposal was rejected\n{context.last_invalid_reason}")
    if running := running_note(context):
        parts.append(f"\n## Running now on other workers\n{running}")
    if context.elsewhere:
        lines = "\n".join(context.elsewhere)
        parts.append(f"\n## What worked on other machines (same workspace, normalised)\n{lines}")
    if context.plateau:
        parts.append(
            f"\n## Plateau\n{context.plateau} candidates in a row kept nothing: try something bolder."
        )
    parts.append(
        "\n## Rules\n"
        f"Edit only these files: {', '.join(editable)}. Editing any other file gets the proposal refused.\n"
        f"Write a one-line description of your change into {DESCRIPTION_FILE}. Do not run long jobs."
    )
    return "\n".join(parts) + "\n"


def _notes(workspace: Path, config: NightlabConfig) -> LessonWriter | None:
    """With `memory_notes = "llm"`, lessons from [proposer.llm]'s model, where one is configured: the agent
    has no LLM of its own to ask."""
    settings = config.proposer.section("llm")
    if config.proposer.memory_notes != "llm" or not isinstance(settings, LLMSection):
        return None
    if not configured_model(settings):
        return None
    return LLMProposer(settings, workspace=workspace, memory_notes="llm").notes


def _read_tree(root: Path) -> dict[str, str]:
    """Every file under root, by relative path, skipping the brief and description the agent is given."""
    out: dict[str, str] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink() and rel not in (BRIEF_FILE, DESCRIPTION_FILE):
            out[rel] = path.read_text(errors="replace")
    return out


def _copy_tracked(workspace: Path, scratch: Path) -> None:
    """The committed files at HEAD (the best commit): untracked data and nightlab's state stay behind."""
    archive = subprocess.run(
        ["git", "-C", str(workspace), "archive", "HEAD"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive.stdout, check=True)


@register
class AgentProposer(PluggableProposer):
    """Runs a coding agent command in a scratch copy and proposes the diff of the editable files."""

    name = "agent"
    settings = AgentSection

    @classmethod
    def from_config(cls, settings: AgentSection, workspace: Path, config: NightlabConfig) -> AgentProposer:
        hidden = config.sandbox.hidden_paths()
        return cls(
            settings,
            workspace,
            list(config.workspace.editable),
            sandbox=config.sandbox.mode,
            hidden=hidden,
            memory_tokens=config.proposer.memory_tokens,
            notes=_notes(workspace, config),
        )

    def __init__(
        self,
        settings: AgentSection,
        workspace: Path,
        editable: list[str],
        *,
        sandbox: str = "auto",
        hidden: list[Path] | None = None,
        memory_tokens: int = 4000,
        notes: LessonWriter | None = None,
    ):
        if not settings.command.strip():
            raise AgentError('[proposer.agent] command is required, e.g. command = "claude -p"')
        self.settings = settings
        self.workspace = Path(workspace).resolve()
        self.editable = editable
        self.jailed, self.jail_reason = resolve_mode(sandbox)
        # The workspace itself (journal, logs, data under it) and the splits are out of the agent's sight.
        self.hidden = [self.workspace, *(hidden or [])]
        self.memory_tokens, self.notes = memory_tokens, notes
        self.transcripts: list[str] = []

    def _argv(self, scratch: Path) -> list[str]:
        """`bash -c command`, jailed where a jail can be made: the scratch copy is its one writable place."""
        argv = ["bash", "-c", self.settings.command]
        if not self.jailed:
            return argv
        jail, self.jail_reason = worker_jail(scratch, self.hidden, [], network=self.settings.network)
        return [*jail, *argv]

    def _run(self, scratch: Path, brief: str) -> tuple[str, bool]:
        """The command's output and whether it was killed at the timeout (with its process group)."""
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        env.update({k: os.environ[k] for k in self.settings.pass_env if k in os.environ})
        env["TMPDIR"] = str(scratch)
        proc = subprocess.Popen(
            self._argv(scratch),
            cwd=scratch,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(brief.encode(), timeout=self.settings.timeout_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            timed_out = True
        return out.decode(errors="replace")[-TRANSCRIPT_LIMIT:], timed_out

    def propose(self, context: ProposalContext) -> Proposal | None:
        scratch = Path(tempfile.mkdtemp(prefix="nightlab-agent-"))
        try:
            _copy_tracked(self.workspace, scratch)
            before = _read_tree(scratch)
            history = render_memory(
                context.history,
                context.goal,
                context.metric_name,
                self.memory_tokens,
                token_counter(None),
                self.notes,
            )
            brief = render_brief(context, self.editable, history)
            (scratch / BRIEF_FILE).write_text(brief)
            transcript, timed_out = self._run(scratch, brief)
            self.transcripts.append(transcript)
            if context.log_path is not None:  # next to the experiment's own log: what the agent said and did
                context.log_path.parent.mkdir(parents=True, exist_ok=True)
                context.log_path.with_suffix(".agent.log").write_text(transcript, encoding="utf-8")
            if timed_out:
                return Proposal(
                    f"agent timed out after {self.settings.timeout_seconds:g} s", "", "unified_diff"
                )
            after = _read_tree(scratch)
            description_path = scratch / DESCRIPTION_FILE
            description = (
                description_path.read_text().strip().splitlines()[0]
                if description_path.is_file() and description_path.read_text().strip()
                else "change by the coding agent"
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        # A changed or deleted harness file refuses the proposal; a new scratch file (notes) is just left out.
        outside = sorted(p for p in changed if p in before and not is_editable(p, self.editable))
        changed = {p for p in changed if is_editable(p, self.editable)}
        if outside:
            return Proposal(
                f"agent edited non-editable files (refused, never run): {', '.join(outside)}",
                "",
                "unified_diff",
                rationale=transcript,
            )
        patch = unified_diff(
            {p: before[p] for p in changed if p in before}, {p: after[p] for p in changed if p in after}
        )
        jail = "jailed" if self.jailed else f"NOT jailed ({self.jail_reason})"
        return Proposal(description, patch, "unified_diff", rationale=f"[agent {jail}]\n{transcript}")

    def feedback(self, proposal: Proposal, outcome: Outcome) -> None:
        """Nothing to learn: the agent reads the history in its next brief."""
