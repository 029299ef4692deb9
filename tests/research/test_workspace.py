"""The workspace's git side: init, exact resets, harness integrity, editable paths."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from nightlab.config import load_config
from nightlab.research.workspace import Workspace, WorkspaceError, available_templates, init_workspace
from tests.research.loop_workspace import commit_all


def test_init_copies_a_template_into_a_fresh_repo(tmp_path):
    root = init_workspace("quadratic", tmp_path / "ws")
    ws = Workspace(root, load_config(root))
    assert set(ws.tracked_files()) >= {"train.py", "evaluate.py", "nightlab.toml", "program.md", ".gitignore"}
    assert ws.tracked_changes() == [] and ws.current_branch() == "main"
    assert ".nightlab" in (root / ".git" / "info" / "exclude").read_text()


def test_init_errors_are_clear(tmp_path):
    with pytest.raises(WorkspaceError, match="unknown template 'nope'; available: .*quadratic"):
        init_workspace("nope", tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="not empty"):
        init_workspace("quadratic", tmp_path / "b")
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"
    assert "quadratic" in available_templates()


def test_reset_restores_tracked_and_removes_run_leftovers(tmp_path):
    root = init_workspace("quadratic", tmp_path / "ws")
    (root / "my_notes.txt").write_text("the user's own untracked file")
    ws = Workspace(root, load_config(root))
    ws.exclude_state_dir()
    preserved = ws.untracked_entries()
    assert preserved == ["my_notes.txt"]
    head = ws.head()
    (root / ".nightlab").mkdir()
    (root / ".nightlab" / "journal.sqlite").write_text("state")
    (root / "train.py").write_text("broken")
    (root / "run").mkdir()
    (root / "run" / "model.json").write_text("{}")
    (root / "new_file.py").write_text("x")
    (root / "__pycache__").mkdir()
    ws.reset_to(head, preserved)
    assert ws.tracked_changes() == []
    assert not (root / "run").exists() and not (root / "new_file.py").exists()
    assert not (root / "__pycache__").exists()
    assert (root / ".nightlab" / "journal.sqlite").read_text() == "state"
    assert (root / "my_notes.txt").exists()


def test_harness_change_is_detected(tmp_path):
    root = init_workspace("quadratic", tmp_path / "ws")
    ws = Workspace(root, load_config(root))
    hashes = ws.harness_hashes()
    assert "evaluate.py" in hashes and "nightlab.toml" in hashes and "train.py" not in hashes
    ws.check_harness(hashes)
    (root / "evaluate.py").write_text("print('loss: 0')\n")
    with pytest.raises(WorkspaceError, match="harness files changed since the run started: evaluate.py"):
        ws.check_harness(hashes)


def test_editable_symlink_is_refused(tmp_path):
    root = init_workspace("quadratic", tmp_path / "ws")
    outside = tmp_path / "outside.py"
    outside.write_text("X = 1\n")
    os.remove(root / "train.py")
    os.symlink(outside, root / "train.py")
    commit_all(root, "symlinked train.py")
    ws = Workspace(root, load_config(root))
    with pytest.raises(WorkspaceError, match="train.py is a symlink"):
        ws.editable_files()
    with pytest.raises(WorkspaceError, match="symlink"):
        ws.write_files({"train.py": "X = 2\n"})
    assert outside.read_text() == "X = 1\n"


def test_reset_removes_a_nested_repository(tmp_path):
    root = init_workspace("quadratic", tmp_path / "ws")
    ws = Workspace(root, load_config(root))
    nested = root / "vendor"
    nested.mkdir()
    subprocess.run(["git", "init", "-q", str(nested)], check=True)
    (nested / "shortcut.json").write_text("{}")
    assert ws.strays([]) == ["vendor"]
    ws.reset_to(ws.head(), [])
    assert not nested.exists() and ws.strays([]) == []


def test_commits_are_never_signed(tmp_path):
    root = init_workspace("quadratic", tmp_path / "ws")
    ws = Workspace(root, load_config(root))
    ws.git("config", "commit.gpgsign", "true")
    ws.git("config", "gpg.program", "false")
    (root / "train.py").write_text((root / "train.py").read_text().replace("WIDTH = 4", "WIDTH = 8"))
    commit = ws.commit("wider", ["train.py"])
    assert ws.git("log", "-1", "--format=%H %G?", commit) == f"{commit} N"


@pytest.mark.parametrize(
    ("editable", "words"),
    [
        (["*.toml", "train.py"], "matches nightlab.toml, the workspace config"),
        (["*.md", "train.py"], "program.md, the agent's instructions"),
        (
            ["*.py"],
            "evaluate.py, named by the harness step experiment.evaluate ('python evaluate.py --split val')",
        ),
    ],
)
def test_editable_globs_may_not_reach_the_rules(tmp_path, editable, words):
    root = init_workspace("quadratic", tmp_path / "ws")
    config = load_config(root)
    config.workspace.editable = editable
    with pytest.raises(WorkspaceError, match=re.escape(words)):
        Workspace(root, config).editable_files()
