"""The workspace's git side: the run branch, commits of kept code, exact reverts, and harness integrity.

Everything goes through the `git` command line so the repository stays an ordinary one a person can inspect.
The state dir `.nightlab/` (journal, logs) is excluded from git and survives every clean.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from nightlab.config import NightlabConfig
from nightlab.research.edits import is_editable
from nightlab.research.journal import STATE_DIR


class WorkspaceError(RuntimeError):
    """The workspace is not in a state the loop can work with; the message says how to fix it."""


def _escape_pattern(name: str) -> str:
    return "/" + "".join("\\" + c if c in "*?[]!#\\ " else c for c in name)


class Workspace:
    """A git repository the loop edits, runs and reverts."""

    def __init__(self, root: Path, config: NightlabConfig):
        self.root = Path(root).resolve()
        self.config = config
        if not (self.root / ".git").exists():
            raise WorkspaceError(f"{self.root} is not a git repository; create one with `nightlab init`")

    # --- git plumbing ----------------------------------------------------------------------------------

    def git(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            ["git", "-c", "core.quotepath=off", *args], cwd=self.root, capture_output=True, text=True
        )
        if check and proc.returncode != 0:
            raise WorkspaceError(f"git {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout.rstrip("\n")

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def current_branch(self) -> str:
        return self.git("rev-parse", "--abbrev-ref", "HEAD")

    def branch_exists(self, branch: str) -> bool:
        return bool(self.git("branch", "--list", branch))

    def exclude_state_dir(self) -> None:
        """Keep `.nightlab/` out of git (status, commits and cleans) without touching tracked files."""
        exclude = Path(self.git("rev-parse", "--git-path", "info/exclude"))
        exclude = exclude if exclude.is_absolute() else self.root / exclude
        exclude.parent.mkdir(parents=True, exist_ok=True)
        lines = exclude.read_text().splitlines() if exclude.exists() else []
        if f"/{STATE_DIR}/" not in lines:
            exclude.write_text("\n".join([*lines, f"/{STATE_DIR}/"]) + "\n")

    def tracked_changes(self) -> list[str]:
        out = self.git("status", "--porcelain", "--untracked-files=no")
        return [line[3:] for line in out.splitlines() if line.strip()]

    def untracked_entries(self) -> list[str]:
        """Top-level untracked or ignored names now present (the user's own files, before a run starts)."""
        out = self.git("status", "--porcelain", "--ignored", "--untracked-files=normal")
        names = set()
        for line in out.splitlines():
            if line[:2] in ("??", "!!"):
                names.add(line[3:].strip('"').split("/")[0])
        names.discard(STATE_DIR)
        return sorted(names)

    def checkout_run_branch(self, branch: str) -> None:
        """Create the run branch at HEAD (or switch to it); the user's own branch is never moved."""
        if self.current_branch() == branch:
            return
        if self.branch_exists(branch):
            self.git("checkout", "--quiet", branch)
        else:
            self.git("checkout", "--quiet", "-b", branch)

    def commit(self, message: str, files: list[str]) -> str:
        """Commit the given (editable) files; return the new commit."""
        self.git("add", "--", *files)
        self.git(
            "-c", "user.name=nightlab", "-c", "user.email=nightlab@localhost", "commit", "--quiet",
            "--no-verify", "-m", message,
        )
        return self.head()

    def reset_to(self, commit: str, preserved: list[str]) -> None:
        """Return exactly to `commit`: tracked files reset, everything a run left behind removed.

        Untracked names that existed before the run started (`preserved`, e.g. a venv) survive; scratch
        paths are always wiped.
        """
        self.git("reset", "--quiet", "--hard", commit)
        scratch = {s.strip("/").split("/")[0] for s in self.config.workspace.scratch}
        keep = [STATE_DIR, *(p for p in preserved if p not in scratch)]
        args = ["clean", "-fdxq"]
        for name in keep:
            args += ["-e", _escape_pattern(name)]
        self.git(*args)
        for s in self.config.workspace.scratch:
            path = self.root / s
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def diff(self, parent: str, commit: str) -> str:
        return self.git("diff", parent, commit)

    # --- files -----------------------------------------------------------------------------------------

    def tracked_files(self) -> list[str]:
        return [f for f in self.git("ls-files", "-z").split("\0") if f]

    def editable_files(self) -> list[str]:
        """Tracked files the agent may change; each must be a regular file inside the workspace."""
        files = [f for f in self.tracked_files() if is_editable(f, self.config.workspace.editable)]
        for rel in files:
            self.check_regular(rel)
        if not files:
            raise WorkspaceError(
                f"workspace.editable {self.config.workspace.editable} matches no tracked file in {self.root}"
            )
        return files

    def check_regular(self, rel: str) -> Path:
        path = self.root / rel
        if path.is_symlink():
            raise WorkspaceError(f"editable path {rel} is a symlink; editable files must be regular files")
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise WorkspaceError(f"editable path {rel} resolves outside the workspace")
        return resolved

    def read_editable(self) -> dict[str, str]:
        return {rel: (self.root / rel).read_text(encoding="utf-8") for rel in self.editable_files()}

    def write_files(self, files: dict[str, str]) -> None:
        """Write new texts of editable files (a patch may also create a new file matching the globs)."""
        for rel, text in files.items():
            if not is_editable(rel, self.config.workspace.editable):
                raise WorkspaceError(f"refusing to write {rel}: it is not an editable file of this workspace")
            path = self.check_regular(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")

    # --- harness integrity -----------------------------------------------------------------------------

    def harness_hashes(self) -> dict[str, str]:
        """sha256 of every tracked file that is not editable, as it is on disk now."""
        out: dict[str, str] = {}
        for rel in self.tracked_files():
            if is_editable(rel, self.config.workspace.editable):
                continue
            path = self.root / rel
            if path.is_symlink():
                out[rel] = "symlink:" + str(path.readlink())
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "missing"
        return out

    def check_harness(self, recorded: dict[str, str]) -> None:
        """Raise WorkspaceError naming every harness file that differs from the hashes taken at start."""
        now = self.harness_hashes()
        changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
        if changed:
            raise WorkspaceError(f"harness files changed since the run started: {', '.join(changed)}")


# --- creating a workspace from a template ----------------------------------------------------------------


def templates_dir() -> Path:
    import nightlab.templates

    return Path(nightlab.templates.__file__).parent


def available_templates() -> list[str]:
    return sorted(
        p.name for p in templates_dir().iterdir() if p.is_dir() and (p / "nightlab.toml").is_file()
    )


def init_workspace(template: str, dest: Path) -> Path:
    """Copy a built-in template to `dest` and make it a git repository with one initial commit."""
    names = available_templates()
    if template not in names:
        raise WorkspaceError(f"unknown template {template!r}; available: {', '.join(names) or '(none)'}")
    dest = Path(dest).resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise WorkspaceError(f"{dest} exists and is not empty; choose a new or empty directory")
    shutil.copytree(
        templates_dir() / template, dest, dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".nightlab"),
    )

    def git(*args: str) -> None:
        proc = subprocess.run(["git", *args], cwd=dest, capture_output=True, text=True)
        if proc.returncode != 0:
            raise WorkspaceError(f"git {' '.join(args)} failed in {dest}: {proc.stderr.strip()}")

    git("init", "--quiet", "--initial-branch=main")
    git("add", "--all")
    git("-c", "user.name=nightlab", "-c", "user.email=nightlab@localhost", "commit", "--quiet", "-m",
        f"nightlab workspace from template {template}")
    exclude = dest / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    exclude.write_text((exclude.read_text() if exclude.exists() else "") + f"/{STATE_DIR}/\n")
    return dest
