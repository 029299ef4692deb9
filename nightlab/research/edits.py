"""Edit formats a proposer may answer in (search/replace blocks, unified diffs): parse, validate, apply.

Nothing here writes to the workspace: `apply_patch` returns the new file texts and the caller commits them,
so a rejected patch can never leave half-edited files behind.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from nightlab.errors import NightlabError

FORMAT_EXAMPLE = """path/to/file.py
<<<<<<< SEARCH
exact lines copied from the current file
=======
the lines that replace them
>>>>>>> REPLACE"""

_SEARCH = re.compile(r"^\s*<{5,9} ?SEARCH\s*$")
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9} ?REPLACE\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_FILENAME_LOOKBACK = 3


class EditError(NightlabError, ValueError):
    """A patch that cannot be applied; the message says what is wrong and how to write it instead."""


@dataclass(frozen=True)
class SearchReplace:
    """Replace the exact text `search` in `path` by `replace`; an empty `search` creates a new file."""

    path: str
    search: str
    replace: str


# --- editable globs ---


def _glob_part_regex(part: str) -> str:
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := part.find("]", i + 2)) != -1:
            body = part[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body.replace("\\", "\\\\")) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = PurePosixPath(pattern).parts
    out = []
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
        else:
            out.append(_glob_part_regex(part) + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z")


def is_editable(rel_path: str, patterns: list[str]) -> bool:
    """True when a workspace-relative path matches one of the editable globs.

    Globs follow `Path.glob`: `*` stays inside one directory and `**` spans any number of them, so the
    patterns select exactly the files that `root.glob(pattern)` would list.
    """
    path = PurePosixPath(rel_path)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return False
    return any(_glob_regex(p).match(str(path)) for p in patterns)


# --- search/replace blocks ---


def _clean_filename(line: str) -> str | None:
    name = line.strip().strip("`*").strip()
    name = name.lstrip("#").strip().strip("`*").rstrip(":").strip()
    return name if name and not any(ch.isspace() for ch in name) else None


def _filename_before(lines: list[str], index: int) -> str | None:
    """The file name on the line right before a block, looking past code fences and blank lines."""
    for line in reversed(lines[max(0, index - _FILENAME_LOOKBACK) : index]):
        if _FENCE.match(line) or not line.strip():
            continue
        if _REPLACE.match(line):
            return None
        return _clean_filename(line)
    return None


def _find_marker(lines: list[str], start: int, want: re.Pattern[str]) -> int | None:
    """Index of the next `want` marker, or None when another kind of marker or the end comes first."""
    for j in range(start, len(lines)):
        if want.match(lines[j]):
            return j
        if any(m.match(lines[j]) for m in (_SEARCH, _DIVIDER, _REPLACE)):
            return None
    return None


def parse_search_replace(text: str) -> list[SearchReplace]:
    """Read every SEARCH/REPLACE block of an answer, each preceded by its file's relative path.

    A block without a file name line reuses the previous block's file, as people write several edits to one
    file in a row.
    """
    lines = text.replace("\r\n", "\n").splitlines(keepends=True)
    blocks: list[SearchReplace] = []
    previous: str | None = None
    i = 0
    while i < len(lines):
        if _REPLACE.match(lines[i]):
            raise EditError(
                f"line {i + 1}: `{lines[i].strip()}` without a `<<<<<<< SEARCH` line before it; "
                f"write each block as:\n{FORMAT_EXAMPLE}"
            )
        if not _SEARCH.match(lines[i]):
            i += 1
            continue
        path = _filename_before(lines, i) or previous
        if path is None:
            raise EditError(
                f"line {i + 1}: a SEARCH block without a file name; put the file's relative path alone "
                f"on the line right before `<<<<<<< SEARCH`, like this:\n{FORMAT_EXAMPLE}"
            )
        divider = _find_marker(lines, i + 1, _DIVIDER)
        if divider is None:
            raise EditError(
                f"line {i + 1}: the block for {path} has no `=======` line between its SEARCH and REPLACE "
                f"parts; write it as:\n{FORMAT_EXAMPLE}"
            )
        end = _find_marker(lines, divider + 1, _REPLACE)
        if end is None:
            raise EditError(
                f"line {i + 1}: the block for {path} is not closed by a `>>>>>>> REPLACE` line "
                f"(was the answer cut off?); write it as:\n{FORMAT_EXAMPLE}"
            )
        blocks.append(SearchReplace(path, "".join(lines[i + 1 : divider]), "".join(lines[divider + 1 : end])))
        previous = path
        i = end + 1
    if not blocks:
        raise EditError(f"no SEARCH/REPLACE blocks found; write each change as:\n{FORMAT_EXAMPLE}")
    return blocks


def _as_lines(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def format_search_replace(blocks: list[SearchReplace]) -> str:
    """The canonical text of some blocks; `parse_search_replace` reads it back unchanged."""
    return "\n".join(
        f"{b.path}\n<<<<<<< SEARCH\n{_as_lines(b.search)}=======\n{_as_lines(b.replace)}>>>>>>> REPLACE\n"
        for b in blocks
    )


def _not_found(number: int, block: SearchReplace, text: str) -> EditError:
    want = block.search.splitlines()
    have = text.splitlines()
    windows = ["\n".join(have[k : k + len(want)]) for k in range(max(1, len(have) - len(want) + 1))]
    close = difflib.get_close_matches("\n".join(want), windows, n=1, cutoff=0.6)
    hint = ""
    if close:
        start = windows.index(close[0]) + 1
        hint = (
            f"\nThe closest text in {block.path} (lines {start}-{start + len(want) - 1}) is:\n{close[0]}\n"
            "Copy the lines exactly as they are now, including indentation."
        )
    return EditError(
        f"block {number}: the SEARCH text was not found in {block.path}; SEARCH must match the current "
        f"file exactly, character for character.{hint}"
    )


def apply_search_replace(files: Mapping[str, str], blocks: list[SearchReplace]) -> dict[str, str]:
    """Apply blocks in order to in-memory files; return {path: new text} for each file that changed.

    Raises EditError when a SEARCH text is missing or ambiguous, or when nothing changes.
    """
    current = dict(files)
    for number, block in enumerate(blocks, 1):
        text = current.get(block.path)
        if text is None:
            if block.search.strip():
                known = ", ".join(sorted(current)) or "(none)"
                raise EditError(
                    f"block {number}: {block.path} does not exist (files: {known}); check the path, or leave "
                    "SEARCH empty to create a new file"
                )
            current[block.path] = block.replace
            continue
        if not block.search.strip():
            raise EditError(
                f"block {number}: SEARCH is empty but {block.path} already exists; copy the exact lines to "
                "replace into SEARCH"
            )
        # A file without a final newline still matches a SEARCH that ends with its last line.
        padded = not text.endswith("\n")
        work = text + "\n" if padded else text
        count = work.count(block.search)
        if count == 0:
            raise _not_found(number, block, text)
        if count > 1:
            raise EditError(
                f"block {number}: the SEARCH text occurs {count} times in {block.path}; add neighbouring "
                "lines to SEARCH so that it matches exactly one place"
            )
        work = work.replace(block.search, block.replace, 1)
        current[block.path] = work[:-1] if padded and work.endswith("\n") else work
    changed = {path: text for path, text in current.items() if files.get(path) != text}
    if not changed:
        raise EditError(
            "the patch changes nothing (each REPLACE equals what it replaces); propose a real change"
        )
    return changed


# --- paths ---


def _check_path(root: Path, rel: str, editable: list[str]) -> str:
    """Normalise a patch path and refuse anything but an editable regular file inside the workspace."""
    path = PurePosixPath(rel.strip())
    if not path.parts or path.is_absolute() or ".." in path.parts:
        raise EditError(f"{rel!r} is outside the workspace; use paths relative to the workspace root")
    name = str(path)
    if not is_editable(name, editable):
        raise EditError(
            f"{name} is not editable: it matches none of the editable patterns {editable}; it is part of the "
            "harness, so change only the editable files"
        )
    where = root
    for part in path.parts:
        where = where / part
        if where.is_symlink():
            raise EditError(
                f"{name} goes through a symlink ({where.relative_to(root)}); only regular files "
                "inside the workspace can be edited"
            )
    if not where.resolve().is_relative_to(root.resolve()):
        raise EditError(f"{name} resolves outside the workspace")
    if where.exists() and not where.is_file():
        raise EditError(f"{name} is not a regular file")
    return name


def _read(root: Path, rel: str) -> str | None:
    path = root / rel
    if not path.exists():
        return None
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EditError(f"{rel} is not UTF-8 text and cannot be edited: {exc}") from exc


def _apply_blocks(root: Path, patch: str, editable: list[str]) -> dict[str, str]:
    blocks = parse_search_replace(patch)
    blocks = [SearchReplace(_check_path(root, b.path, editable), b.search, b.replace) for b in blocks]
    files = {b.path: text for b in blocks if (text := _read(root, b.path)) is not None}
    return apply_search_replace(files, blocks)


# --- unified diffs ---


def _diff_header_path(line: str) -> str | None:
    path = line[4:].split("\t", 1)[0].strip()
    return None if path == "/dev/null" else path


def _strip_prefix(path: str | None, strip: int) -> str | None:
    return None if path is None else path.split("/", strip)[strip]


def _diff_paths(patch: str) -> tuple[list[tuple[str | None, str | None]], int]:
    """(old, new) path pairs of a diff, and the -p level: 1 when git's a/ b/ prefixes are used."""
    lines = patch.splitlines()
    pairs = [
        (_diff_header_path(old), _diff_header_path(new))
        for old, new in zip(lines, lines[1:], strict=False)
        if old.startswith("--- ") and new.startswith("+++ ")
    ]
    prefixed = all((o is None or o.startswith("a/")) and (n is None or n.startswith("b/")) for o, n in pairs)
    strip = 1 if prefixed else 0
    return [(_strip_prefix(o, strip), _strip_prefix(n, strip)) for o, n in pairs], strip


def _git_apply(tree: Path, patch_file: Path, strip: int) -> str | None:
    """Apply a diff inside `tree`; None on success, else git's complaint about the strict attempt.

    A second try with --recount forgives hunk headers whose line counts are off, a common slip in
    hand-written diffs; git applies all or nothing, so a failed try leaves the tree as it was.
    """
    first_error = None
    for extra in ([], ["--recount"]):
        result = subprocess.run(
            ["git", "apply", f"-p{strip}", "--whitespace=nowarn", *extra, str(patch_file)],
            cwd=tree,
            capture_output=True,
            text=True,
            # Keep git from treating a repository above the temp dir as the one to patch.
            env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)},
        )
        if result.returncode == 0:
            return None
        first_error = first_error or result.stderr.strip()
    return first_error


def _apply_unified(root: Path, patch: str, editable: list[str]) -> dict[str, str]:
    pairs, strip = _diff_paths(patch)
    if not pairs:
        raise EditError(
            "no file headers found in the unified diff; each file needs `--- a/PATH` and `+++ b/PATH`"
        )
    paths: list[str] = []
    for old, new in pairs:
        if new is None:
            raise EditError(f"the diff deletes {old}; deleting files is not supported, empty it instead")
        if old is not None and old != new:
            raise EditError(f"the diff renames {old} to {new}; renames are not supported")
        paths.append(_check_path(root, new, editable))
    originals = {p: text for p in paths if (text := _read(root, p)) is not None}
    with tempfile.TemporaryDirectory(prefix="nightlab-patch-") as tmp:
        tree = Path(tmp, "tree")
        tree.mkdir()
        for rel, text in originals.items():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_bytes(text.encode("utf-8"))
        patch_file = Path(tmp, "change.patch")
        patch_file.write_bytes(_as_lines(patch).encode("utf-8"))
        error = _git_apply(tree, patch_file, strip)
        if error is not None:
            raise EditError(
                "the unified diff does not apply to the current files (its context lines must match them "
                f"exactly):\n{error}"
            )
        new_texts = {p: (tree / p).read_bytes().decode("utf-8") for p in paths}
    changed = {p: t for p, t in new_texts.items() if originals.get(p) != t}
    if not changed:
        raise EditError("the patch changes nothing; propose a real change")
    return changed


def apply_patch(
    root: Path,
    patch: str,
    patch_format: Literal["search_replace", "unified_diff"],
    editable: list[str],
) -> dict[str, str]:
    """Check a patch against the workspace at `root`; return {relative path: new full text} per changed file.

    Raises EditError for a non-editable, outside or symlinked path, a SEARCH text that is missing or
    ambiguous, a diff that does not apply cleanly, or a patch that changes nothing. Writes nothing.
    """
    root = Path(root)
    if patch_format == "search_replace":
        return _apply_blocks(root, patch, editable)
    if patch_format == "unified_diff":
        return _apply_unified(root, patch, editable)
    raise EditError(f"unknown patch format {patch_format!r}; use 'search_replace' or 'unified_diff'")


def unified_diff(old: dict[str, str], new: dict[str, str]) -> str:
    """A git-style diff from `old` to `new` file texts, for the journal; `apply_patch` can replay it."""
    out: list[str] = []
    for path in sorted(set(old) | set(new)):
        before, after = old.get(path), new.get(path)
        if before == after:
            continue
        for line in difflib.unified_diff(
            (before or "").splitlines(keepends=True),
            (after or "").splitlines(keepends=True),
            f"a/{path}" if before is not None else "/dev/null",
            f"b/{path}" if after is not None else "/dev/null",
        ):
            out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)
