"""The experiment jail, exercised with the real bwrap: what a phase can write, see, reach and leave behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from nightlab.config import ConfigError, NightlabConfig, parse_config
from nightlab.research import sandbox
from nightlab.research.sandbox import (
    BWRAP_ENV,
    Phase,
    SandboxSpec,
    SandboxUnavailable,
    detect,
    interpreter_paths,
    resolve_mode,
    spec_for_phase,
)

STATUS = detect()
needs_bwrap = pytest.mark.skipif(not STATUS.available, reason=f"no usable bubblewrap: {STATUS.reason}")
ENV = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}

TOML = """
[workspace]
editable = ["train.py"]
scratch = ["ckpt"]

[experiment]
command = "python train.py"

[metric]
name = "val_loss"

[sandbox]
read_only = ["$NL_TEST_DATA"]
writable = ["~/.cache/nl-test"]
train_hidden = ["data/val", "$NL_TEST_DATA/val.bin"]
eval_hidden = ["data/test"]
"""


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace with git history, a journal, harness and editable files, and splits in and out of it."""
    root = tmp_path / "ws"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "nightlab.toml").write_text(TOML)
    (root / "program.md").write_text("make val_loss lower\n")
    (root / "prepare.py").write_text("HARNESS = 1\n")
    (root / "train.py").write_text("LR = 0.1\n")
    (root / ".nightlab").mkdir()
    (root / ".nightlab" / "journal.sqlite").write_bytes(b"journal")
    for split in ("val", "test"):
        (root / "data" / split).mkdir(parents=True)
        (root / "data" / split / "labels.txt").write_text(f"{split}-labels\n")
    data = tmp_path / "data_cache"
    data.mkdir()
    (data / "train.bin").write_text("train-tokens\n")
    (data / "val.bin").write_text("val-tokens\n")
    monkeypatch.setenv("NL_TEST_DATA", str(data))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return root


def jail(
    ws: Path, phase: Phase, script: str, config: NightlabConfig | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    config = config or parse_config((ws / "nightlab.toml").read_text())
    env = {**ENV, "HOME": os.environ["HOME"]}  # a private home, with the writable cache under it bound in
    spec = spec_for_phase(config, ws, phase, [ws / "train.py"], env=env)
    return subprocess.run(spec.wrap(["bash", "-c", script]), capture_output=True, text=True, timeout=60, **kw)


def try_write(name: str) -> str:
    return f"if echo x >> {name}; then echo 'wrote {name}'; fi"


@needs_bwrap
def test_train_writes_editable_files_only(ws: Path) -> None:
    names = ["train.py", "prepare.py", "nightlab.toml", "program.md", "new_file.py"]
    out = jail(ws, "train", "; ".join(try_write(n) for n in names))
    assert out.stdout.split("\n")[:-1] == ["wrote train.py"]
    assert out.stderr.count("Read-only file system") == 4
    assert (ws / "train.py").read_text() == "LR = 0.1\nx\n"
    assert (ws / "prepare.py").read_text() == "HARNESS = 1\n"
    assert not (ws / "new_file.py").exists()


@needs_bwrap
def test_editable_files_are_read_only_outside_training(ws: Path) -> None:
    for phase in ("setup", "evaluate", "heldout", "checks"):
        out = jail(ws, phase, try_write("train.py"))
        assert "wrote" not in out.stdout, phase
    assert (ws / "train.py").read_text() == "LR = 0.1\n"


@needs_bwrap
def test_scratch_and_writable_caches_are_writable_and_created(ws: Path, tmp_path: Path) -> None:
    cache = tmp_path / "home" / ".cache" / "nl-test"
    out = jail(ws, "train", f"echo ckpt > ckpt/model.pt && echo hit > {cache}/compiled && echo ok")
    assert out.stdout == "ok\n", out.stderr
    assert (ws / "ckpt" / "model.pt").read_text() == "ckpt\n"
    assert (cache / "compiled").read_text() == "hit\n"
    train_split = tmp_path / "data_cache" / "train.bin"
    out = jail(ws, "train", f"cat {train_split}; {try_write(str(train_split))}")
    assert out.stdout == "train-tokens\n", out.stderr
    assert "Read-only file system" in out.stderr


@needs_bwrap
def test_only_setup_and_training_write_scratch_and_caches(ws: Path, tmp_path: Path) -> None:
    cache = tmp_path / "home" / ".cache" / "nl-test"
    for phase in ("setup", "train", "evaluate", "heldout", "checks"):
        out = jail(ws, phase, f"{try_write(f'ckpt/{phase}')}; {try_write(f'{cache}/{phase}')}")
        expected = [f"wrote ckpt/{phase}", f"wrote {cache}/{phase}"] if phase in ("setup", "train") else []
        assert out.stdout.split("\n")[:-1] == expected, (phase, out.stderr)
    assert sorted(p.name for p in (ws / "ckpt").iterdir()) == ["setup", "train"]
    assert sorted(p.name for p in cache.iterdir()) == ["setup", "train"]


@needs_bwrap
def test_setup_read_only_paths_are_seen_by_setup_alone(ws: Path, tmp_path: Path) -> None:
    outside, inside = tmp_path / "raw", ws / "raw"
    for raw in (outside, inside):
        raw.mkdir()
        (raw / "corpus.txt").write_text("every document, val and test included\n")
    config = parse_config((ws / "nightlab.toml").read_text())
    config.sandbox.setup_read_only = [str(outside), "raw"]
    script = (
        f"cat {outside}/corpus.txt raw/corpus.txt 2>/dev/null; {try_write(f'{outside}/corpus.txt')}; true"
    )
    for phase in ("setup", "train", "evaluate", "heldout", "checks"):
        out = jail(ws, phase, script, config=config)
        seen = ["every document, val and test included"] * 2 if phase == "setup" else []
        assert out.stdout.split("\n")[:-1] == seen, (phase, out.stderr)
    assert (outside / "corpus.txt").read_text() == "every document, val and test included\n"


@needs_bwrap
def test_setup_writes_next_to_its_data_in_a_cache_outside_home(
    ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template's setup keeps downloads beside the data it prepares in nightlab's cache, wherever it
    is."""
    cache = tmp_path / "elsewhere" / "cache"
    monkeypatch.setenv("NIGHTLAB_CACHE_DIR", str(cache))
    config = parse_config((ws / "nightlab.toml").read_text())
    config.sandbox.read_only = ["${NIGHTLAB_CACHE_DIR}/tinygpt"]
    script = f"mkdir -p {cache}/downloads && echo archive > {cache}/downloads/a.tar.gz && echo ok"
    out = jail(ws, "setup", script, config=config)
    assert out.stdout == "ok\n", out.stderr
    assert (cache / "downloads" / "a.tar.gz").read_text() == "archive\n" and (cache / "tinygpt").is_dir()
    out = jail(
        ws, "train", try_write(f"{cache}/downloads/b") + f"; {try_write(f'{cache}/tinygpt/b')}", config=config
    )
    assert "wrote" not in out.stdout and not (cache / "downloads" / "b").exists()


@needs_bwrap
def test_git_and_journal_are_invisible_and_untouchable(ws: Path) -> None:
    script = (
        "ls -A .git | wc -l; test -e .nightlab/journal.sqlite && echo journal-visible; "
        "touch .nightlab/x .git/x"
    )
    out = jail(ws, "train", script)
    assert out.stdout == "0\n"
    assert out.stderr.count("Read-only file system") == 2
    assert (ws / ".nightlab" / "journal.sqlite").read_bytes() == b"journal"
    assert not (ws / ".nightlab" / "x").exists()


@pytest.fixture
def venv_in_cache(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A virtual environment inside the writable cache (Poetry keeps its venvs under ~/.cache), taken for the
    Python that runs nightlab; its `python3` is a hard link of `python`, as some installers make them."""
    venv = tmp_path / "home" / ".cache" / "nl-test" / "pypoetry" / "venv"
    site_packages = venv / "lib" / "python3" / "site-packages"
    site_packages.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    os.link(venv / "bin" / "python", venv / "bin" / "python3")
    monkeypatch.setattr(sandbox, "interpreter_paths", lambda: [venv, venv / "bin", site_packages])
    return venv


@needs_bwrap
def test_a_python_environment_inside_a_writable_cache_stays_read_only(ws: Path, venv_in_cache: Path) -> None:
    """A `.pth` file in site-packages runs at every Python start: in evaluate, and in the unsandboxed loop."""
    pth = venv_in_cache / "lib" / "python3" / "site-packages" / "evil.pth"
    cache = venv_in_cache.parent.parent
    script = "; ".join(
        [try_write(str(pth)), try_write(f"{venv_in_cache}/bin/python"), try_write(f"{cache}/compiled")]
    )
    for phase in ("setup", "train"):
        out = jail(ws, phase, script)
        assert out.stdout == f"wrote {cache}/compiled\n", (phase, out.stderr)
        assert out.stderr.count("Read-only file system") == 2, (phase, out.stderr)
    assert not pth.exists() and (venv_in_cache / "bin" / "python").read_text() == "#!/bin/sh\n"


@needs_bwrap
@pytest.mark.skipif(
    sys.prefix == sys.base_prefix, reason="nightlab is not running from a virtual environment"
)
def test_the_running_python_stays_read_only_under_a_writable_parent(ws: Path) -> None:
    """The real interpreter, with the directory that holds its venv (and perhaps nightlab) writable; the
    check only asks whether a write would be allowed, so nothing is written if it would."""
    holder = Path(sys.prefix).resolve().parent
    assert holder != Path("/")
    spec = SandboxSpec(ws, writable=[holder], env=ENV, bwrap=str(STATUS.bwrap))
    targets = [sys.prefix, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["scripts"]]
    targets.append(str(Path(sandbox.__file__).resolve().parents[1]))
    script = "; ".join(f"[ -w {t} ] && echo writable {t}" for t in targets) + "; echo done"
    out = subprocess.run(spec.wrap(["bash", "-c", script]), capture_output=True, text=True, timeout=60)
    assert out.stdout == "done\n", out.stderr


def test_interpreter_paths_cover_the_venv_its_packages_and_nightlab() -> None:
    paths = interpreter_paths()
    for expected in (
        sys.prefix,
        sys.base_prefix,
        sysconfig.get_paths()["purelib"],
        Path(sys.executable).parent,
    ):
        assert Path(os.path.realpath(expected)) in paths
    assert Path(sandbox.__file__).resolve().parents[1] in paths


def test_a_writable_entry_inside_the_python_environment_is_refused(ws: Path, venv_in_cache: Path) -> None:
    config = parse_config((ws / "nightlab.toml").read_text())
    for inside in (venv_in_cache / "lib" / "python3" / "site-packages" / "mypkg", venv_in_cache):
        config.sandbox.writable = [str(inside)]
        with pytest.raises(ConfigError, match=f"writable entry '{inside}'.* lies inside {venv_in_cache}"):
            spec_for_phase(config, ws, "train", [])
    assert not (venv_in_cache / "lib" / "python3" / "site-packages" / "mypkg").exists()


def test_a_writable_entry_holding_hard_links_to_the_python_environment_is_refused(
    ws: Path, venv_in_cache: Path, tmp_path: Path
) -> None:
    """uv links its cache's files into the venvs it installs: writing the cache's copy writes the venv."""
    module = venv_in_cache / "lib" / "python3" / "site-packages" / "torch.py"
    module.write_text("import os\n")
    uv_cache = tmp_path / "home" / ".cache" / "nl-test" / "uv" / "archive"
    uv_cache.mkdir(parents=True)
    os.link(module, uv_cache / "torch.py")
    config = parse_config((ws / "nightlab.toml").read_text())
    with pytest.raises(ConfigError, match=f"holds {uv_cache}/torch.py, a hard link to {module}"):
        spec_for_phase(config, ws, "train", [])


def visible_splits(ws: Path, phase: Phase, data: str) -> set[str]:
    script = f"cat data/val/labels.txt data/test/labels.txt {data}/val.bin 2>/dev/null; true"
    return set(jail(ws, phase, script).stdout.split())


@needs_bwrap
def test_each_phase_sees_only_its_splits(ws: Path, tmp_path: Path) -> None:
    data = str(tmp_path / "data_cache")
    assert visible_splits(ws, "train", data) == set()
    assert visible_splits(ws, "checks", data) == set()
    assert visible_splits(ws, "evaluate", data) == {"val-labels", "val-tokens"}
    assert visible_splits(ws, "heldout", data) == {"val-labels", "test-labels", "val-tokens"}
    assert visible_splits(ws, "setup", data) == {"val-labels", "test-labels", "val-tokens"}
    assert (ws / "data" / "test" / "labels.txt").read_text() == "test-labels\n"


@pytest.fixture
def server() -> Iterator[int]:
    """A listening TCP port on the host's loopback: a connect succeeds without anyone accepting."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        yield srv.getsockname()[1]


@needs_bwrap
@pytest.mark.parametrize("network", [False, True])
def test_network_only_when_allowed(ws: Path, server: int, network: bool) -> None:
    code = f"import socket; socket.create_connection(('127.0.0.1', {server}), timeout=5); print('connected')"
    spec = SandboxSpec(ws, network=network, env=ENV, bwrap=str(STATUS.bwrap))
    out = subprocess.run(spec.wrap([sys.executable, "-c", code]), capture_output=True, text=True, timeout=60)
    if network:
        assert out.stdout == "connected\n", out.stderr
    else:
        assert out.returncode != 0
        assert "ConnectionRefusedError" in out.stderr


@needs_bwrap
def test_setup_has_the_network_even_when_experiments_do_not(ws: Path, server: int) -> None:
    out = jail(ws, "setup", f"exec 3<>/dev/tcp/127.0.0.1/{server} && echo connected")
    assert out.stdout == "connected\n", out.stderr
    out = jail(ws, "evaluate", f"exec 3<>/dev/tcp/127.0.0.1/{server} && echo connected")
    assert out.stdout == ""


@needs_bwrap
def test_own_pid_namespace(ws: Path) -> None:
    out = jail(ws, "train", "echo $$; cat /proc/1/comm; ls /proc | grep -c '^[0-9]*$'")
    pid, init, count = out.stdout.split()
    assert int(pid) <= 3, "the script should be one of the first processes of a fresh PID namespace"
    assert init == "bwrap"
    assert int(count) < 10, "host processes must not be visible"


def host_processes(token: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] == ["sleep", token]:
            found.append(p)
    return found


def wait_until(cond: object, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def start_jail_with_sleeper(ws: Path, token: str, tail: str) -> subprocess.Popen[str]:
    config = parse_config((ws / "nightlab.toml").read_text())
    spec = spec_for_phase(config, ws, "train", [], env=ENV)
    argv = spec.wrap(["bash", "-c", f"sleep {token} & echo ready; {tail}"])
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    assert wait_until(lambda: host_processes(token)), "the background sleep should be running"
    return proc


@pytest.fixture
def token(request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique `sleep` argument to find jailed processes on the host; stragglers are killed afterwards."""
    value = f"{9000 + os.getpid() % 1000}.{abs(hash(request.node.name)) % 10**6}"
    yield value
    for p in host_processes(value):
        p.kill()


@needs_bwrap
def test_background_child_dies_when_the_main_process_exits(ws: Path, token: str) -> None:
    proc = start_jail_with_sleeper(ws, token, "read _; exit 0")
    proc.communicate("\n", timeout=30)
    assert proc.returncode == 0
    assert wait_until(lambda: not host_processes(token)), "the jail's background child outlived it"


@needs_bwrap
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_process_group_kills_the_whole_jail(ws: Path, sig: signal.Signals, token: str) -> None:
    proc = start_jail_with_sleeper(ws, token, "wait")
    os.killpg(proc.pid, sig)  # what the runner's hard timeout does
    proc.communicate(timeout=30)
    assert wait_until(lambda: not host_processes(token)), "a jailed process survived its killed group"


@needs_bwrap
def test_environment_is_only_what_was_passed(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIGHTLAB_TEST_SECRET", "must-not-leak")
    spec = SandboxSpec(ws, env={"FOO": "bar baz", "PATH": "/usr/bin:/bin"}, bwrap=str(STATUS.bwrap))
    out = subprocess.run(spec.wrap(["env"]), capture_output=True, text=True, timeout=60)
    # bwrap's --chdir sets PWD, the one variable added.
    assert sorted(out.stdout.splitlines()) == ["FOO=bar baz", "PATH=/usr/bin:/bin", f"PWD={ws.resolve()}"]


@needs_bwrap
def test_home_is_private_empty_and_writable(ws: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret\n")
    spec = SandboxSpec(ws, env={**ENV, "HOME": str(home)}, bwrap=str(STATUS.bwrap))
    script = (
        "ls -A ~ | wc -l; mkdir -p ~/.triton/cache && echo cached > ~/.triton/cache/k "
        "&& cat ~/.triton/cache/k"
    )
    out = subprocess.run(spec.wrap(["bash", "-c", script]), capture_output=True, text=True, timeout=60)
    assert out.stdout == "0\ncached\n", out.stderr
    assert sorted(p.name for p in home.iterdir()) == [".ssh"]


@needs_bwrap
def test_auto_and_required_use_a_working_bwrap() -> None:
    assert resolve_mode("auto") == (True, STATUS.reason)
    assert resolve_mode("required") == (True, STATUS.reason)
    assert STATUS.version and STATUS.version[0].isdigit()


def test_required_raises_when_bwrap_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(BWRAP_ENV, str(tmp_path / "no-bwrap"))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        resolve_mode("required")
    sandboxed, reason = resolve_mode("auto")
    assert not sandboxed
    assert "unsandboxed" in reason and "no-bwrap" in reason and "not found" in reason


def test_auto_falls_back_when_bwrap_cannot_build_a_jail(tmp_path: Path) -> None:
    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    broken.chmod(0o755)
    status = detect(str(broken))
    assert not status.available
    assert "No permissions to creating new namespace" in status.reason
    assert "user namespaces" in status.reason
    sandboxed, reason = resolve_mode("auto", bwrap=str(broken))
    assert not sandboxed and reason.startswith("unsandboxed:")
    with pytest.raises(SandboxUnavailable, match="cannot build a sandbox"):
        resolve_mode("required", bwrap=str(broken))


def test_off_never_probes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(BWRAP_ENV, str(tmp_path / "no-bwrap"))
    assert resolve_mode("off") == (False, 'unsandboxed: [sandbox] mode = "off"')
    with pytest.raises(ValueError, match="auto, required or off"):
        resolve_mode("sometimes")


def test_bad_writable_paths_are_refused(ws: Path) -> None:
    config = parse_config((ws / "nightlab.toml").read_text())
    (ws / "link.py").symlink_to(ws / "prepare.py")
    with pytest.raises(ValueError, match="symlink"):
        spec_for_phase(config, ws, "train", [ws / "link.py"])
    with pytest.raises(ValueError, match="inside the workspace"):
        spec_for_phase(config, ws, "train", [ws.parent / "elsewhere.py"])
    with pytest.raises(ValueError, match="inside the workspace"):
        spec_for_phase(config, ws, "train", [ws / ".nightlab" / "journal.sqlite"])
    inside = config.model_copy(deep=True)
    inside.sandbox.writable = ["cache"]
    with pytest.raises(ValueError, match="scratch"):
        spec_for_phase(inside, ws, "train", [])
    whole = config.model_copy(deep=True)
    whole.workspace.scratch = ["."]
    with pytest.raises(ValueError, match="inside the workspace"):
        spec_for_phase(whole, ws, "train", [])
    with pytest.raises(ValueError, match="unknown phase"):
        spec_for_phase(config, ws, "deploy", [])  # type: ignore[arg-type]


def test_missing_configured_paths_are_skipped(ws: Path, tmp_path: Path) -> None:
    config = parse_config((ws / "nightlab.toml").read_text())
    config.sandbox.read_only.append(str(tmp_path / "absent-dir"))
    config.sandbox.train_hidden.append(str(tmp_path / "absent-split"))
    argv = spec_for_phase(config, ws, "train", [ws / "train.py"], env=ENV).wrap(["true"])
    assert not any("absent" in a for a in argv)
    if STATUS.available:
        assert subprocess.run(argv, timeout=60).returncode == 0
