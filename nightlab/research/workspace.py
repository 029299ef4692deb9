"""The workspace's git side: the run branch, commits of kept code, exact reverts, and harness integrity.

Everything goes through the `git` command line so the repository stays an ordinary one a person can inspect.
The state dir `.nightlab/` (journal, logs) is excluded from git and survives every clean.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from nightlab.config import CONFIG_NAME, NightlabConfig
from nightlab.errors import NightlabError
from nightlab.research.edits import is_editable
from nightlab.research.journal import STATE_DIR


class WorkspaceError(NightlabError, RuntimeError):
    """The workspace is not in a state the loop can work with; the message says how to fix it."""


def _escape_pattern(name: str) -> str:
    return "/" + "".join("\\" + c if c in "*?[]!#\\ " else c for c in name)


# Every git call: a user's `commit.gpgsign = true` must not make the loop's commits wait for a key or fail.
_GIT = ["git", "-c", "core.quotepath=off", "-c", "commit.gpgsign=false"]
_HARNESS_STEPS = ("setup", "evaluate", "heldout", "checks")


def _named_paths(command: str) -> set[str]:
    """The workspace-relative paths a command line names (e.g. prepare.py in `python prepare.py evaluate`)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return {os.path.normpath(w) for w in words if not w.startswith("-") and not os.path.isabs(w)}


class Workspace:
    """A git repository the loop edits, runs and reverts."""

    def __init__(self, root: Path, config: NightlabConfig):
        self.root = Path(root).resolve()
        self.config = config
        if not (self.root / ".git").exists():
            raise WorkspaceError(f"{self.root} is not a git repository; create one with `nightlab init`")

    # --- git plumbing ----------------------------------------------------------------------------------

    def git(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run([*_GIT, *args], cwd=self.root, capture_output=True, text=True)
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
        """Commit the given (editable) files; return the new commit. When git refuses (a path that .gitignore
        excludes, a change that changes nothing), raise WorkspaceError saying why."""
        try:
            self.git("add", "--", *files)
            self.git(
                "-c",
                "user.name=nightlab",
                "-c",
                "user.email=nightlab@localhost",
                "commit",
                "--quiet",
                "--no-verify",
                "-m",
                message,
            )
        except WorkspaceError as exc:
            raise WorkspaceError(f"the change could not be committed: {exc}") from exc
        return self.head()

    def _scratch_tops(self) -> set[str]:
        return {s.strip("/").split("/")[0] for s in self.config.workspace.scratch}

    def strays(self, preserved: list[str]) -> list[str]:
        """Untracked or ignored top-level names that are neither preserved nor scratch: written where no phase
        may."""
        allowed = set(preserved) | self._scratch_tops()
        return [name for name in self.untracked_entries() if name not in allowed]

    def reset_to(self, commit: str, preserved: list[str]) -> None:
        """Return exactly to `commit`: tracked files reset, everything a run left behind removed.

        Untracked names that existed before the run started (`preserved`, e.g. a venv) survive; scratch
        paths are always wiped. Nested git repositories go too (`-ff`).
        """
        self.git("reset", "--quiet", "--hard", commit)
        scratch = self._scratch_tops()
        keep = [STATE_DIR, *(p for p in preserved if p not in scratch)]
        args = ["clean", "-ffdxq"]
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
        """Tracked files the agent may change; each must be a regular file inside the workspace, and none may
        be the config, the agent's instructions or a file a harness step runs."""
        files = [f for f in self.tracked_files() if is_editable(f, self.config.workspace.editable)]
        for rel in files:
            self.check_regular(rel)
            self.check_not_harness(rel)
        if not files:
            raise WorkspaceError(
                f"workspace.editable {self.config.workspace.editable} matches no tracked file in {self.root}"
            )
        return files

    def check_not_harness(self, rel: str) -> None:
        """Refuse an editable path that would let the agent change the rules it is judged by."""
        ws, exp = self.config.workspace, self.config.experiment
        what = {CONFIG_NAME: "the workspace config", os.path.normpath(ws.program): "the agent's instructions"}
        for step in _HARNESS_STEPS:
            command = getattr(exp, step)
            for path in _named_paths(command or ""):
                what.setdefault(path, f"named by the harness step experiment.{step} ({command!r})")
        rel = os.path.normpath(rel)
        for path, why in what.items():
            if rel == path or rel.startswith(path + "/"):
                raise WorkspaceError(
                    f"workspace.editable {self.config.workspace.editable} matches {rel}, {why}; the agent "
                    "must not be able to change it: narrow the globs"
                )

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

    def editable_at(self, commit: str) -> dict[str, str]:
        """The editable files as `commit` holds them, read from git without touching the working tree."""
        names = self.git("ls-tree", "-r", "-z", "--name-only", commit).split("\0")
        editable = [n for n in names if n and is_editable(n, self.config.workspace.editable)]
        return {rel: self.git("show", f"{commit}:{rel}") for rel in editable}

    def write_files(self, files: dict[str, str]) -> None:
        """Write new texts of editable files (a patch may also create a new file matching the globs)."""
        for rel, text in files.items():
            if not is_editable(rel, self.config.workspace.editable):
                raise WorkspaceError(f"refusing to write {rel}: it is not an editable file of this workspace")
            self.check_not_harness(rel)
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
    return sorted(p.name for p in templates_dir().iterdir() if p.is_dir() and (p / "nightlab.toml").is_file())


def init_workspace(template: str, dest: Path) -> Path:
    """Copy a built-in template to `dest` and make it a git repository with one initial commit."""
    names = available_templates()
    if template not in names:
        raise WorkspaceError(f"unknown template {template!r}; available: {', '.join(names) or '(none)'}")
    dest = Path(dest).resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise WorkspaceError(f"{dest} exists and is not empty; choose a new or empty directory")
    shutil.copytree(
        templates_dir() / template,
        dest,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".nightlab"),
    )

    def git(*args: str) -> None:
        proc = subprocess.run(["git", *args], cwd=dest, capture_output=True, text=True)
        if proc.returncode != 0:
            raise WorkspaceError(f"git {' '.join(args)} failed in {dest}: {proc.stderr.strip()}")

    git("init", "--quiet", "--initial-branch=main")
    git("add", "--all")
    git(
        "-c",
        "user.name=nightlab",
        "-c",
        "user.email=nightlab@localhost",
        "-c",
        "commit.gpgsign=false",
        "commit",
        "--quiet",
        "-m",
        f"nightlab workspace from template {template}",
    )
    exclude = dest / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    exclude.write_text((exclude.read_text() if exclude.exists() else "") + f"/{STATE_DIR}/\n")
    return dest
