"""Find the numeric constants at the top of editable Python files, and rewrite one without touching the rest.

Workspaces keep their hyperparameters as `UPPER_CASE = number` lines at the top of the file the agent edits;
those lines are the knobs a tuner can turn without understanding the code.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

_CONSTANT_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class Knob:
    """A top-level `NAME = number` assignment, with the exact place of the number in its source line."""

    name: str
    path: str
    value: int | float
    lineno: int  # 1-based line of the assignment
    line: str  # that whole line, newline included
    start: int  # character offsets of the number literal within `line`
    end: int

    @property
    def literal(self) -> str:
        """The number as written in the source (e.g. `3e-4`, `1_000`)."""
        return self.line[self.start : self.end]


def source_lines(text: str) -> list[str]:
    """Lines as Python numbers them (split on \\n only, unlike str.splitlines), newlines kept."""
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def format_number(value: float, integer: bool) -> str:
    """A short Python literal for a tuned value: ints exact, floats to 4 significant digits, still floats."""
    if integer:
        return str(int(round(value)))
    text = f"{value:.4g}"
    return text if any(ch in text for ch in ".eEn") else text + ".0"


def _number(node: ast.expr) -> int | float | None:
    """The value of an int/float literal, possibly negated; booleans and everything else give None."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        sign, node = -1, node.operand
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return sign * node.value
    return None


def _assigned_names(node: ast.stmt) -> list[str]:
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def _char_offset(line: str, byte_offset: int) -> int:
    # ast reports columns in UTF-8 bytes; the line may hold non-ASCII text before the number.
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8"))


def _file_knobs(path: str, text: str) -> list[Knob]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []  # a broken file has no knobs; the experiment run reports the error itself
    counts = Counter(name for node in tree.body for name in _assigned_names(node))
    lines = source_lines(text)
    knobs = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value_node = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value_node = node.target, node.value
        else:
            continue
        if not isinstance(target, ast.Name) or not _CONSTANT_NAME.match(target.id):
            continue
        value = _number(value_node)
        # A name assigned twice is ambiguous to tune; a multi-line value cannot be rewritten as one line.
        if value is None or counts[target.id] > 1 or value_node.end_lineno != value_node.lineno:
            continue
        line = lines[value_node.lineno - 1]
        start = _char_offset(line, value_node.col_offset)
        end = _char_offset(line, value_node.end_col_offset or 0)
        knobs.append(Knob(target.id, path, value, value_node.lineno, line, start, end))
    return knobs


def find_knobs(files: Mapping[str, str]) -> dict[str, Knob]:
    """Every top-level `UPPER_CASE = number` of the Python files, by name.

    Names defined in more than one file are left out: a tuner could not tell which one is meant.
    """
    found = [
        k for path, text in sorted(files.items()) if path.endswith(".py") for k in _file_knobs(path, text)
    ]
    per_name = Counter(k.name for k in found)
    return {k.name: k for k in found if per_name[k.name] == 1}
