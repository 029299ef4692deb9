"""Kept commits travel between machines as git bundles: made from a workspace, fetched into another."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from nightlab.errors import NightlabError

HUB_REFS = "refs/hub/"


class BundleError(NightlabError, RuntimeError):
    """A bundle could not be made or read (a commit the workspace lacks, a bundle missing its base)."""


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"git {' '.join(args)} failed in {root}: {done.stderr.strip()}")
    return done.stdout.strip()


def make_bundle(root: Path, commit: str, base: str) -> bytes:
    """`commit` and its history since `base` (which the receiver has: it is the workspace's starting point).

    The bundle names the commit under refs/hub/<sha>, so the receiver finds it without guessing a branch."""
    ref = HUB_REFS + commit
    _git(root, "update-ref", ref, commit)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kept.bundle"
        _git(root, "bundle", "create", "-q", str(path), f"^{base}", ref)
        return path.read_bytes()


def import_bundle(root: Path, commit: str, data: bytes) -> str:
    """Fetch `commit` from bundle bytes into the workspace as refs/hub/<sha>; return that ref."""
    ref = HUB_REFS + commit
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kept.bundle"
        path.write_bytes(data)
        _git(root, "fetch", "-q", str(path), f"{ref}:{ref}")
    if _git(root, "rev-parse", ref) != commit:
        raise BundleError(f"the bundle for {commit} holds another commit")
    return ref
