"""What the llm proposer's model may look at before it answers: read-only tools over function calling.

A one-shot prompt holds the editable files and the run's memory; a model that wants more (a harness file,
the diff and log of experiment #37, every earlier try at warmup) asks for it with a tool call. Tools only
read: the workspace's files (never nightlab's state, git's, or the hidden splits) and the history. The model
still answers in the usual text format, or through `submit_proposal`, which writes that text for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nightlab.research.memory import full
from nightlab.research.proposers.base import ProposalContext
from nightlab.research.safe_text import terminal_safe

FILE_LIMIT = 64 * 1024  # characters of one file or log a tool returns
LOG_TAIL = 4000
_PRIVATE = (".git", ".nightlab")


def _function(tool: str, what: str, **params: str) -> dict[str, Any]:
    """A function-calling schema: `tool` does `what`, taking string `params` (an integer `number`)."""
    properties = {
        p: {"type": "integer" if p == "number" else "string", "description": d} for p, d in params.items()
    }
    schema = {"type": "object", "properties": properties, "required": list(params)}
    return {"type": "function", "function": {"name": tool, "description": what, "parameters": schema}}


TOOLS = [
    _function("list_files", "The workspace's files, which of them you may edit, and their sizes."),
    _function("read_file", "A file of the workspace (harness files too, read-only).", path="its path"),
    _function(
        "read_experiment",
        "An earlier experiment: decision, metric, margin, reason, its diff and the end of its log.",
        number="the experiment's number",
    ),
    _function(
        "search_history",
        "Earlier experiments whose description, reason or diff mention the text.",
        text="what to look for",
    ),
    _function(
        "submit_proposal",
        "Submit the experiment (instead of answering in the text format).",
        description="one short line saying what this experiment changes",
        rationale="why it should help",
        blocks="the SEARCH/REPLACE blocks, each preceded by its file's path, exactly as in the text format",
    ),
]


class ToolBox:
    """Answers the model's tool calls for one proposal; `submitted` holds the answer text once submitted."""

    def __init__(self, root: Path, context: ProposalContext, hidden: list[Path]):
        self.root, self.context = root.resolve(), context
        self.hidden = [p.resolve() for p in hidden]
        self.submitted: str | None = None

    def call(self, name: str, arguments: str) -> str:
        """The tool's answer as text; a bad call gets an error the model can read and correct."""
        try:
            args = json.loads(arguments or "{}")
            if not isinstance(args, dict):
                raise ValueError("arguments must be a JSON object")
            tool = getattr(self, f"tool_{name}", None)
            if tool is None:
                return (
                    f"error: no tool {name!r}; use one of {', '.join(t['function']['name'] for t in TOOLS)}"
                )
            return tool(**args)
        except (ValueError, TypeError) as exc:
            return f"error: {exc}"

    def _visible(self, path: Path) -> bool:
        rel = path.relative_to(self.root).parts if path.is_relative_to(self.root) else ()
        return bool(rel) and rel[0] not in _PRIVATE and not any(path.is_relative_to(h) for h in self.hidden)

    def tool_list_files(self) -> str:
        lines = []
        for path in sorted(p for p in self.root.rglob("*") if p.is_file() and self._visible(p)):
            rel = path.relative_to(self.root).as_posix()
            mark = "editable" if rel in self.context.files else "read-only"
            lines.append(f"{rel} ({path.stat().st_size} bytes, {mark})")
        return "\n".join(lines[:500]) or "(no files)"

    def tool_read_file(self, path: str) -> str:
        target = (self.root / path).resolve()
        if not self._visible(target) or not target.is_file():
            return f"error: {path} is not a file you may read; list_files shows those"
        return target.read_text(encoding="utf-8", errors="replace")[:FILE_LIMIT]

    def tool_read_experiment(self, number: int) -> str:
        past = next((p for p in self.context.history if p.number == int(number)), None)
        if past is None:
            return f"error: no experiment #{number} in this run's history"
        text = full(past)
        if self.context.log_path is not None:
            log = self.context.log_path.parent / f"{past.number:04d}.log"
            if log.is_file():
                tail = log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
                text += f"\nend of its log:\n{terminal_safe(tail)}"
        return text

    def tool_search_history(self, text: str) -> str:
        needle = text.lower()
        hits = [
            full(p)
            for p in self.context.history
            if needle in f"{p.description}\n{p.reason}\n{p.patch}".lower()
        ]
        return "\n".join(hits[:20])[:FILE_LIMIT] or f"no experiment mentions {text!r}"

    def tool_submit_proposal(self, description: str, blocks: str, rationale: str = "") -> str:
        self.submitted = f"DESCRIPTION: {description}\nRATIONALE: {rationale}\n\n{blocks}"
        return "submitted"
