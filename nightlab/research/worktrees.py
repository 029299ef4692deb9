"""Each parallel worker's own copy of the run's workspace: a git worktree of the same repository.

Experiments that run at once cannot share one checkout, so worker `slot` of run `tag` works in
`.nightlab/workers/<tag>/<slot>/`, a detached worktree (it shares the repository's objects, so every commit
the driver makes is there at once, and nothing a worker does moves the run's branch). The untracked entries
the run preserves (data the user put there before the run) are linked or copied in, since git does not know
them. The process group of the phase a worker is running is noted beside its worktree, so that whoever finds
the worker gone (the driver, or the next `nightlab run` after a kill -9) can stop what it left running
before the worktree is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from nightlab.research.execution import stop_orphan
from nightlab.research.journal import STATE_DIR
from nightlab.research.workspace import Workspace

WORKERS_DIR = "workers"


def run_dir(root: Path, tag: str) -> Path:
    return root / STATE_DIR / WORKERS_DIR / tag


def slot_dir(root: Path, tag: str, slot: int) -> Path:
    return run_dir(root, tag) / str(slot)


def _pgid_file(root: Path, tag: str, slot: int) -> Path:
    return run_dir(root, tag) / f"{slot}.pgid"


def create(ws: Workspace, tag: str, slot: int, commit: str, preserved: list[str]) -> Path:
    """A fresh worktree for `slot` at `commit` with the preserved entries; an old one there is removed."""
    path = slot_dir(ws.root, tag, slot)
    remove(ws, tag, slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    ws.git("worktree", "add", "--quiet", "--detach", "--force", str(path), commit)
    for name in preserved:
        source = ws.root / name
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, path / name, symlinks=True, copy_function=_link_or_copy)
        elif source.exists() or source.is_symlink():
            _link_or_copy(str(source), str(path / name))
    return path


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system allows one (data can be large), else a copy."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def note_process(root: Path, tag: str, slot: int, pgid: int) -> None:
    """Remember the process group the worker in `slot` is running now."""
    path = _pgid_file(root, tag, slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(str(pgid))
    os.replace(temporary, path)


def stop(root: Path, tag: str, slot: int) -> None:
    """Stop what the worker in `slot` left running (if it still works in its worktree)."""
    path = _pgid_file(root, tag, slot)
    with contextlib.suppress(OSError, ValueError):
        stop_orphan(int(path.read_text()), slot_dir(root, tag, slot).resolve())
    path.unlink(missing_ok=True)


def remove(ws: Workspace, tag: str, slot: int) -> None:
    """Stop the slot's leftovers and delete its worktree (files and git's record of it)."""
    stop(ws.root, tag, slot)
    path = slot_dir(ws.root, tag, slot)
    if path.exists():
        ws.git("worktree", "remove", "--force", "--force", str(path), check=False)
        shutil.rmtree(path, ignore_errors=True)
    ws.git("worktree", "prune")


def clear(ws: Workspace, tag: str) -> None:
    """Remove every worker's worktree of run `tag`: after a run, or on resume after a kill."""
    directory = run_dir(ws.root, tag)
    if not directory.is_dir():
        return
    slots = {p.name.split(".")[0] for p in directory.iterdir()}
    for slot in sorted(s for s in slots if s.isdigit()):
        remove(ws, tag, int(slot))
    shutil.rmtree(directory, ignore_errors=True)
