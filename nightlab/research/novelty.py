"""The novelty gate: a proposal whose code this run already measured costs no run.

Agents propose the same idea again (a dead end retried, a change reverted to the baseline, a tuner landing
on values it tried), and every such run buys nothing but a second sample of a known result. Before a
committed candidate runs, its editable files are compared with those of every experiment this run measured,
after setting aside what cannot change behaviour: formatting and comments, and in Python also docstrings (the
files are compared as syntax trees). Knob values (`Proposal.params`) repeated on the same parent count as
the same code too. A match is recorded as `duplicate`, naming the earlier experiment, and handed back to the
proposer with that experiment's result.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Callable, Mapping, Sequence

from nightlab.research.journal import Experiment

# Decisions whose code never ran to a result: nothing to be a duplicate of.
_NOT_MEASURED = ("invalid", "duplicate")


def normalised(path: str, text: str) -> str:
    """What of a file can change behaviour: a Python file's syntax tree without docstrings (so formatting
    and comments drop out), else its non-blank lines without trailing space."""
    if path.endswith(".py"):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            pass  # compared as text: a file that does not parse fails the same way whatever its layout
        else:
            _drop_docstrings(tree)
            return ast.dump(tree, annotate_fields=False, include_attributes=False)
    return "\n".join(stripped for line in text.splitlines() if (stripped := line.rstrip()))


def _drop_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        scoped = isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        if scoped and node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def fingerprint(files: Mapping[str, str]) -> str:
    """One hash of a set of files, each normalised: equal for code that differs only in layout."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{len(path)}:{path}".encode())
        body = normalised(path, files[path]).encode()
        digest.update(f"{len(body)}:".encode() + body)
    return digest.hexdigest()


class NoveltyGate:
    """Finds the earlier experiment a candidate repeats; `files_at(commit)` gives a commit's editable files.
    Fingerprints are cached by commit, so each commit of a run is read from git once per session."""

    def __init__(self, files_at: Callable[[str], dict[str, str]]):
        self._files_at = files_at
        self._fingerprints: dict[str, str] = {}

    def _fingerprint_of(self, commit: str) -> str:
        if commit not in self._fingerprints:
            self._fingerprints[commit] = fingerprint(self._files_at(commit))
        return self._fingerprints[commit]

    def earlier(self, records: Sequence[Experiment], candidate: Experiment) -> Experiment | None:
        """The first measured experiment in `records` with the committed candidate's code, or with its knob
        values on the same parent; None when the candidate is new."""
        assert candidate.commit_sha is not None, "a candidate is compared once committed"
        mine = self._fingerprint_of(candidate.commit_sha)
        for r in records:
            if r.decision in _NOT_MEASURED or not r.commit_sha or r.number == candidate.number:
                continue
            same_knobs = (
                bool(candidate.params)
                and r.params == candidate.params
                and r.parent_commit == candidate.parent_commit
            )
            if same_knobs or self._fingerprint_of(r.commit_sha) == mine:
                return r
        return None


def duplicate_reason(earlier: Experiment) -> str:
    """Why a candidate was not run, with what its code already scored."""
    result = earlier.decision if earlier.metric is None else f"{earlier.decision}, {earlier.metric:.6g}"
    what = "the baseline" if earlier.kind == "baseline" else f"#{earlier.number} ({earlier.description})"
    status = f"already measured ({result})" if earlier.decision else "running now on another worker"
    return (
        f"duplicate of {what}: the same code once formatting, comments and docstrings are set aside, "
        f"{status}; not run again"
    )
