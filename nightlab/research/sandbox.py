"""The bubblewrap jail one experiment phase runs in.

Code the agent edits runs inside every phase, so a phase sees the system read-only, the workspace read-only
except the files it is allowed to write, and nothing of `.git`, `.nightlab/` (the journal) or the splits
hidden from it. The loop builds one spec per phase with `spec_for_phase(...)` and hands `spec.wrap` to the
runner as its argv wrapper. docs/integrity.md says what this does and does not guarantee.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nightlab.config import ConfigError, NightlabConfig
from nightlab.errors import NightlabError
from nightlab.paths import cache_dir, expand

BWRAP_ENV = "NIGHTLAB_BWRAP"
Phase = Literal["setup", "train", "evaluate", "heldout", "checks"]

# The read-only system view; merged-/usr distributions make some of these symlinks, recreated as such.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Accelerator device nodes and the sysfs parts their drivers read; bound only where they exist.
_DEVICE_GLOBS = ("nvidia*", "dri", "kfd")
_SYSFS_PATHS = ("/sys/bus", "/sys/class", "/sys/dev", "/sys/devices")
# Never visible: the history (git) and nightlab's state (journal, keys, logs).
_PRIVATE_DIRS = (".git", ".nightlab")
_PROBE_TIMEOUT_S = 30.0
# Where the running Python loads code from (sysconfig's names); `data` and `include` hold none.
_CODE_SCHEMES = ("stdlib", "platstdlib", "purelib", "platlib", "scripts")


class SandboxUnavailable(NightlabError, RuntimeError):
    """`[sandbox] mode = "required"` but bubblewrap cannot run here; the message says what to install."""


@dataclass(frozen=True)
class SandboxStatus:
    """Whether bubblewrap works on this machine, and why not when it does not."""

    available: bool
    reason: str
    bwrap: str | None = None
    version: str | None = None


def interpreter_paths() -> list[Path]:
    """What the Python running nightlab loads code from: its virtual environment and base installation, their
    standard library, scripts and site-packages (whose `.pth` files run at every start), and nightlab itself.

    No phase may write these, whatever `[sandbox] writable` says: the evaluate step and the unsandboxed loop
    run this Python next, so a file planted there would run outside the jail."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(sys.executable))
    paths.update(sysconfig.get_paths()[name] for name in _CODE_SCHEMES)
    paths.update(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        paths.add(site.getusersitepackages())
    paths.add(str(Path(__file__).resolve().parents[1]))
    return sorted({Path(os.path.realpath(p)) for p in paths if p and os.path.exists(p)})


@dataclass
class SandboxSpec:
    """What one jailed phase may see and write. Relative paths are taken from the workspace; `protected`
    paths stay read-only also inside a writable directory."""

    workspace: Path
    writable: list[Path] = field(default_factory=list)
    read_only: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    network: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    bwrap: str = "bwrap"
    protected: list[Path] = field(default_factory=interpreter_paths)

    def wrap(self, argv: list[str]) -> list[str]:
        """`wrap_argv` bound to this spec: the `wrap=` callable the runner accepts."""
        return wrap_argv(argv, self)


def _install_hint() -> str:
    if sys.platform == "darwin":
        return "bubblewrap is Linux-only; on macOS experiments run unsandboxed"
    return (
        "install it with `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap` "
        "(Fedora/RHEL)"
    )


def detect(bwrap: str | None = None) -> SandboxStatus:
    """Find bwrap (argument, then $NIGHTLAB_BWRAP, then PATH) and check once that it can build a jail here."""
    path = bwrap or os.environ.get(BWRAP_ENV) or shutil.which("bwrap")
    if path is None:
        return SandboxStatus(False, f"bwrap not found; {_install_hint()}")
    return _probe(path)


@functools.cache
def _probe(path: str) -> SandboxStatus:
    """Run `true` in a jail like the experiments': user namespaces may be off even where bwrap exists."""
    exe = shutil.which(path)
    if exe is None:
        return SandboxStatus(False, f"bwrap {path!r} not found or not executable; {_install_hint()}", path)
    with tempfile.TemporaryDirectory(prefix="nightlab-probe-") as tmp:
        argv = wrap_argv(["true"], SandboxSpec(Path(tmp), env={"PATH": "/usr/bin:/bin"}, bwrap=exe))
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return SandboxStatus(False, f"{exe} could not run: {exc}", exe)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        return SandboxStatus(
            False,
            f"{exe} cannot build a sandbox here ({detail}); unprivileged user namespaces may be disabled "
            "(containers, kernel.unprivileged_userns_clone=0, Ubuntu's "
            "kernel.apparmor_restrict_unprivileged_userns=1)",
            exe,
        )
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()[-1:]
    ver = version[0] if version else "unknown"
    return SandboxStatus(True, f"sandboxed by bubblewrap {ver} ({exe})", exe, ver)


def resolve_mode(mode: str, bwrap: str | None = None) -> tuple[bool, str]:
    """Turn `[sandbox] mode` into (sandboxed, reason); the reason is shown wherever results are."""
    if mode == "off":
        return False, 'unsandboxed: [sandbox] mode = "off"'
    if mode not in ("auto", "required"):
        raise ValueError(f"[sandbox] mode must be auto, required or off, not {mode!r}")
    status = detect(bwrap)
    if status.available:
        return True, status.reason
    if mode == "required":
        raise SandboxUnavailable(
            f'[sandbox] mode = "required" but {status.reason}. '
            'Or set mode = "auto" to run unsandboxed where bubblewrap is missing.'
        )
    return False, f"unsandboxed: {status.reason}"


def _ro(path: Path) -> list[str]:
    return ["--ro-bind", str(path), str(path)]


def _hide(path: Path) -> list[str]:
    """An empty read-only tmpfs over a directory, /dev/null over anything else."""
    if path.is_dir():
        return ["--tmpfs", str(path), "--remount-ro", str(path)]
    return ["--ro-bind", "/dev/null", str(path)]


def _system_args(network: bool) -> list[str]:
    """Read-only system, the Python running nightlab (its venv and base install), nightlab itself, GPUs."""
    args: list[str] = []
    for name in _SYSTEM_PATHS:
        p = Path(name)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), name]
        elif p.exists():
            args += _ro(p)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    extra = [Path(p) for p in sorted(prefixes)] + [Path(__file__).resolve().parents[1]]
    resolv = Path("/etc/resolv.conf").resolve()
    if network and not resolv.is_relative_to("/etc") and resolv.exists():
        extra.append(resolv.parent)  # systemd-resolved keeps the real file under /run
    for p in extra:
        args += _ro(p)
    for pattern in _DEVICE_GLOBS:
        for dev in sorted(Path("/dev").glob(pattern)):
            args += ["--dev-bind", str(dev), str(dev)]
    if "--dev-bind" in args:
        for name in _SYSFS_PATHS:
            if Path(name).exists():
                args += _ro(Path(name))
    return args


def wrap_argv(argv: list[str], spec: SandboxSpec) -> list[str]:
    """The bwrap command line that runs `argv` jailed as `spec` says; later mounts cover earlier ones."""
    ws = spec.workspace.resolve()

    def absolute(paths: list[Path]) -> list[Path]:
        out = [p if p.is_absolute() else ws / p for p in paths]
        return [Path(os.path.normpath(p)) for p in out if p.exists()]

    writable = absolute(spec.writable)
    args = [spec.bwrap, "--unshare-all", "--unshare-pid"]
    if spec.network:
        args.append("--share-net")
    args += ["--die-with-parent", "--new-session", "--clearenv"]
    for key, value in spec.env.items():
        args += ["--setenv", key, value]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    home = os.path.normpath(spec.env.get("HOME", "/"))
    if os.path.isabs(home) and home != "/":
        # An empty private home: tools that cache under ~ (triton, matplotlib) work, the real one stays
        # unseen.
        args += ["--tmpfs", home]
    args += _system_args(spec.network)
    # Outside the workspace first, so that a writable cache enclosing it cannot make the harness writable;
    # parents before children, so a path inside another mount gets its own mode.
    outside = [(p, "--ro-bind") for p in absolute(spec.read_only)]
    outside += [(p, "--bind") for p in writable if not p.is_relative_to(ws)]
    for p, how in sorted(outside, key=lambda mount: len(mount[0].parts)):
        args += [how, str(p), str(p)]
    args += _ro(ws)
    for p in writable:
        if p.is_relative_to(ws):
            args += ["--bind", str(p), str(p)]
    args += _protect(spec.protected, writable)
    hidden = [ws / name for name in _PRIVATE_DIRS] + [p.resolve() for p in absolute(spec.hidden)]
    for p in hidden:
        if p.exists():
            args += _hide(p)
    args += ["--remount-ro", "/", "--chdir", str(ws), "--", *argv]
    return args


def _protect(protected: list[Path], writable: list[Path]) -> list[str]:
    """Bind read-only again each protected path that a writable directory holds, where the jail sees it
    through that directory; bwrap mounts in order, so this later mount wins over the writable one."""
    real_protected = [p.resolve() for p in protected if p.exists()]
    args: list[str] = []
    for w in writable:
        real = w.resolve()
        for p in real_protected:
            if p.is_relative_to(real):
                args += ["--ro-bind", str(p), str(w / p.relative_to(real))]
    return args


@dataclass(frozen=True)
class _PhaseRule:
    writes: bool  # scratch paths and `writable` directories writable (read-only otherwise)
    editable_writable: bool
    network: bool | None  # None: as configured
    prepares: bool  # setup: `read_only` data writable (and created), `setup_read_only` visible
    hide: tuple[Literal["train_hidden", "eval_hidden"], ...]


# setup is the harness step that downloads and prepares data before the baseline: it gets the network and
# sees every split. The test split (eval_hidden) is hidden from all the rest but heldout; training and checks
# run the agent's code alone, so they lose the validation split too. Only setup and training write: what the
# scoring phases read cannot have been changed by a phase that ran the agent's code after it was scored.
_PHASES: dict[str, _PhaseRule] = {
    "setup": _PhaseRule(writes=True, editable_writable=False, network=True, prepares=True, hide=()),
    "train": _PhaseRule(
        writes=True,
        editable_writable=True,
        network=None,
        prepares=False,
        hide=("train_hidden", "eval_hidden"),
    ),
    "evaluate": _PhaseRule(
        writes=False, editable_writable=False, network=None, prepares=False, hide=("eval_hidden",)
    ),
    "heldout": _PhaseRule(writes=False, editable_writable=False, network=None, prepares=False, hide=()),
    "checks": _PhaseRule(
        writes=False,
        editable_writable=False,
        network=None,
        prepares=False,
        hide=("train_hidden", "eval_hidden"),
    ),
}


def _expand(entry: str, workspace: Path) -> Path:
    path = Path(expand(entry))
    return path if path.is_absolute() else workspace / path


def _inside(path: Path, workspace: Path, what: str) -> Path:
    """A workspace path a phase may write: no symlink (it could point at the harness) and no escape."""
    full = Path(os.path.normpath(path if path.is_absolute() else workspace / path))
    rel = full.relative_to(workspace).parts if full.is_relative_to(workspace) else ()
    if not rel or rel[0] in _PRIVATE_DIRS:
        raise ConfigError(
            f"{what} {path} must lie inside the workspace {workspace}, outside .git and .nightlab"
        )
    if full.is_symlink():
        raise ConfigError(f"{what} {path} is a symlink; a writable symlink could expose a harness file")
    return full


def _outside(entry: str, workspace: Path) -> Path:
    """A writable directory outside the workspace, whose writable parts are declared as scratch."""
    path = _expand(entry, workspace)
    if Path(os.path.normpath(path)).is_relative_to(workspace):
        raise ConfigError(
            f"[sandbox] entry {entry!r} is inside the workspace; list a writable place there under "
            "[workspace] scratch"
        )
    return path


def _refuse_interpreter_overlap(path: Path, what: str, protected: Sequence[Path]) -> None:
    """Refuse a writable place inside the Python that runs nightlab, or holding hard links to its files (uv
    links its cache into virtual environments): no read-only bind could cover those. A writable place that
    merely holds that Python is fine; the jail binds the Python read-only again on top."""
    real = Path(os.path.realpath(path))
    protected = tuple(Path(os.path.realpath(p)) for p in protected)
    for p in protected:
        if real.is_relative_to(p):
            raise ConfigError(
                f"{what} ({real}) lies inside {p}, where the Python running nightlab loads code from: a file "
                "written there would run outside the sandbox. Choose a directory outside it."
            )
    shared = _hard_link_into(real, protected) if real.is_dir() else None
    if shared is not None:
        raise ConfigError(
            f"{what} holds {shared[0]}, a hard link to {shared[1]} of the Python running nightlab: writing "
            "one changes the other. Narrow the entry to the cache the experiments need, or reinstall the "
            "environment with copies (uv: UV_LINK_MODE=copy)."
        )


def _hard_link_into(directory: Path, protected: tuple[Path, ...]) -> tuple[Path, Path] | None:
    """A file under `directory` (outside `protected`) that is a hard link of a protected file, with it."""
    mine = _multiply_linked(directory, protected)
    if not mine:
        return None
    for root in protected:
        if any(root != other and root.is_relative_to(other) for other in protected):
            continue  # scanned with the protected path that holds it
        theirs = _multiply_linked(root, ())
        for key in mine.keys() & theirs.keys():
            return mine[key], theirs[key]
    return None


@functools.cache
def _multiply_linked(root: Path, skip: tuple[Path, ...]) -> dict[tuple[int, int], Path]:
    """(device, inode) -> path of each regular file under `root`, outside `skip`, with more than one link.

    Scanned once per process: a jailed phase cannot link to an interpreter file, which lies on another
    mount, so only a package manager run outside nightlab could make a new link."""
    found: dict[tuple[int, int], Path] = {}
    for top, dirs, files in os.walk(root):
        here = Path(top)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(here / name)
                if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                    found[(st.st_dev, st.st_ino)] = here / name
    return found


def _prepared(data: list[Path], workspace: Path) -> list[Path]:
    """What setup may write: the declared data dirs, and nightlab's cache dir when one lies in it, since a
    template's setup keeps its downloads next to the data it prepares there."""
    dirs = [_outside(str(d), workspace) for d in data]
    cache = Path(os.path.normpath(cache_dir()))
    if any(Path(os.path.normpath(d)).is_relative_to(cache) for d in dirs) and not cache.is_relative_to(
        workspace
    ):
        dirs.insert(0, cache)
    return dirs


def spec_for_phase(
    config: NightlabConfig,
    workspace: Path,
    phase: Phase,
    editable_files: Sequence[Path | str],
    env: Mapping[str, str] | None = None,
) -> SandboxSpec:
    """The jail for one phase (`phase` is the kind: train, not "train confirm").

    Missing scratch and `writable` entries are created as directories here, because their read-only parent
    would stop the experiment from making them. `env` is the phase's whole environment (the jail clears the
    rest), the same mapping the runner is given."""
    rule = _PHASES.get(phase)
    if rule is None:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(_PHASES)}")
    ws = workspace.resolve()
    box = config.sandbox
    scratch = [_inside(Path(s), ws, "scratch path") for s in config.workspace.scratch]
    caches = [_outside(w, ws) for w in box.writable]
    data = [_expand(r, ws) for r in box.read_only]
    setup_only = [_expand(r, ws) for r in box.setup_read_only]
    prepared = _prepared(data, ws) if rule.prepares else []
    protected = interpreter_paths()
    named = [(f"scratch path {s!r}", p) for s, p in zip(config.workspace.scratch, scratch, strict=True)]
    named += [(f"[sandbox] writable entry {w!r}", p) for w, p in zip(box.writable, caches, strict=True)]
    named += [(f"setup's data directory {p}", p) for p in prepared]
    for what, d in named:
        _refuse_interpreter_overlap(d, what, protected)
    for d in scratch + caches + prepared:
        if not d.exists():
            d.mkdir(parents=True)
    editable = (
        [_inside(Path(p), ws, "editable file") for p in editable_files] if rule.editable_writable else []
    )
    hidden = [_expand(h, ws) for group in rule.hide for h in getattr(box, group)]
    return SandboxSpec(
        workspace=ws,
        writable=editable + (scratch + caches if rule.writes else []) + prepared,
        read_only=setup_only if rule.prepares else data + ([] if rule.writes else caches),
        hidden=hidden + ([] if rule.prepares else setup_only),
        network=box.network if rule.network is None else rule.network,
        env=dict(env or {}),
        bwrap=detect().bwrap or "bwrap",
        protected=protected,
    )
