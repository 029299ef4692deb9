"""Edit formats: every way a patch can be wrong is refused with a message that says how to fix it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nightlab.research.edits import (
    EditError,
    SearchReplace,
    apply_patch,
    format_search_replace,
    is_editable,
    parse_search_replace,
    unified_diff,
)

TRAIN = "import math\n\nLR = 0.01\nDEPTH = 4\n\n\ndef lr(step):\n    return LR * math.cos(step)\n"
EDITABLE = ["train.py", "models/**/*.py"]


def block(path: str, search: str, replace: str) -> str:
    return f"{path}\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n"


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "prepare.py").write_text("def evaluate():\n    return 1.0\n")
    (tmp_path / "models" / "deep").mkdir(parents=True)
    (tmp_path / "models" / "deep" / "net.py").write_text("WIDTH = 8\n")
    return tmp_path


def test_unfenced_blocks_parse_and_apply(ws: Path) -> None:
    patch = "DESCRIPTION: raise lr\n\n" + block("train.py", "LR = 0.01\n", "LR = 0.02\n")
    assert parse_search_replace(patch) == [SearchReplace("train.py", "LR = 0.01\n", "LR = 0.02\n")]
    new = apply_patch(ws, patch, "search_replace", EDITABLE)
    assert new == {"train.py": TRAIN.replace("LR = 0.01", "LR = 0.02")}
    assert (ws / "train.py").read_text() == TRAIN, "apply_patch must not write files"


def test_fenced_blocks_with_filename_outside_or_inside_the_fence() -> None:
    outside = "train.py\n```python\n<<<<<<< SEARCH\nLR = 0.01\n=======\nLR = 0.03\n>>>>>>> REPLACE\n```\n"
    inside = "```\n**train.py**\n<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 6\n>>>>>>> REPLACE\n```\n"
    assert parse_search_replace(outside) == [SearchReplace("train.py", "LR = 0.01\n", "LR = 0.03\n")]
    assert parse_search_replace(inside) == [SearchReplace("train.py", "DEPTH = 4\n", "DEPTH = 6\n")]


def test_consecutive_blocks_reuse_the_file_name_and_apply_in_order(ws: Path) -> None:
    patch = block("train.py", "LR = 0.01\n", "LR = 0.05\n") + block("", "DEPTH = 4\n", "DEPTH = 2\n").lstrip()
    blocks = parse_search_replace(patch)
    assert [b.path for b in blocks] == ["train.py", "train.py"]
    new = apply_patch(ws, patch, "search_replace", EDITABLE)["train.py"]
    assert "LR = 0.05\nDEPTH = 2\n" in new


def test_format_round_trips() -> None:
    blocks = [SearchReplace("a.py", "x = 1\n", "x = 2\n"), SearchReplace("b/c.py", "", "NEW = 1\n")]
    assert parse_search_replace(format_search_replace(blocks)) == blocks


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("I would raise the learning rate.", "no SEARCH/REPLACE blocks found"),
        ("<<<<<<< SEARCH\nLR = 0.01\n=======\nLR = 1\n>>>>>>> REPLACE\n", "without a file name"),
        ("train.py\n<<<<<<< SEARCH\nLR = 0.01\nLR = 1\n>>>>>>> REPLACE\n", "no `=======` line"),
        ("train.py\n<<<<<<< SEARCH\nLR = 0.01\n=======\nLR = 1\n", "not closed by a `>>>>>>> REPLACE`"),
        ("train.py\nLR = 1\n>>>>>>> REPLACE\n", "without a `<<<<<<< SEARCH` line"),
    ],
)
def test_malformed_blocks_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(EditError, match="(?s)" + message.replace("(", r"\(").replace("[", r"\[")) as err:
        parse_search_replace(text)
    assert "SEARCH" in str(err.value)  # every message shows or names the expected format


def test_search_not_found_points_at_the_closest_lines(ws: Path) -> None:
    patch = block(
        "train.py", "def lr(step):\n  return LR * math.cos(step)\n", "def lr(step):\n    return LR\n"
    )
    with pytest.raises(EditError, match="not found in train.py") as err:
        apply_patch(ws, patch, "search_replace", EDITABLE)
    assert "    return LR * math.cos(step)" in str(err.value)  # the real indentation, to copy
    assert "lines 7-8" in str(err.value)


def test_ambiguous_search_is_refused(ws: Path) -> None:
    (ws / "train.py").write_text("A = 1\nB = 1\nA = 1\n")
    with pytest.raises(EditError, match="occurs 2 times in train.py.*neighbouring lines"):
        apply_patch(ws, block("train.py", "A = 1\n", "A = 2\n"), "search_replace", EDITABLE)


def test_patch_that_changes_nothing_is_refused(ws: Path) -> None:
    with pytest.raises(EditError, match="changes nothing"):
        apply_patch(ws, block("train.py", "LR = 0.01\n", "LR = 0.01\n"), "search_replace", EDITABLE)


def test_harness_file_is_refused(ws: Path) -> None:
    patch = block("prepare.py", "    return 1.0\n", "    return 0.0\n")
    with pytest.raises(EditError, match="prepare.py is not editable.*harness"):
        apply_patch(ws, patch, "search_replace", EDITABLE)


@pytest.mark.parametrize("path", ["../train.py", "/etc/passwd", "models/../prepare.py"])
def test_paths_outside_the_workspace_are_refused(ws: Path, path: str) -> None:
    with pytest.raises(EditError, match="outside the workspace"):
        apply_patch(ws, block(path, "x\n", "y\n"), "search_replace", ["**"])


def test_symlinks_are_refused(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.py").write_text("KEY = 1\n")
    os.symlink(outside / "secret.py", ws / "models" / "link.py")
    os.symlink(outside, ws / "models" / "linked_dir")
    for path in ("models/link.py", "models/linked_dir/secret.py"):
        with pytest.raises(EditError, match="symlink"):
            apply_patch(ws, block(path, "KEY = 1\n", "KEY = 2\n"), "search_replace", EDITABLE)


def test_new_file_with_empty_search_and_missing_file_without(ws: Path) -> None:
    new = apply_patch(ws, block("models/deep/extra.py", "", "HIDDEN = 16\n"), "search_replace", EDITABLE)
    assert new == {"models/deep/extra.py": "HIDDEN = 16\n"}
    with pytest.raises(EditError, match="does not exist"):
        apply_patch(ws, block("models/nope.py", "X = 1\n", "X = 2\n"), "search_replace", EDITABLE)
    with pytest.raises(EditError, match="SEARCH is empty but train.py already exists"):
        apply_patch(ws, block("train.py", "", "X = 2\n"), "search_replace", EDITABLE)


def test_file_without_final_newline_still_matches(ws: Path) -> None:
    (ws / "train.py").write_text("LR = 0.01\nDEPTH = 4")
    new = apply_patch(ws, block("train.py", "DEPTH = 4\n", "DEPTH = 5\n"), "search_replace", EDITABLE)
    assert new == {"train.py": "LR = 0.01\nDEPTH = 5"}


def test_unified_diff_round_trip_including_a_new_file(ws: Path) -> None:
    old = {"train.py": TRAIN}
    new = {"train.py": TRAIN.replace("DEPTH = 4", "DEPTH = 6"), "models/deep/head.py": "OUT = 3"}
    diff = unified_diff(old, new)
    assert "--- a/train.py\n+++ b/train.py\n" in diff and "--- /dev/null\n+++ b/models/deep/head.py\n" in diff
    assert apply_patch(ws, diff, "unified_diff", EDITABLE) == new


def test_unified_diff_with_wrong_hunk_counts_still_applies(ws: Path) -> None:
    diff = "--- train.py\n+++ train.py\n@@ -3,9 +3,9 @@\n LR = 0.01\n-DEPTH = 4\n+DEPTH = 8\n \n"
    assert apply_patch(ws, diff, "unified_diff", EDITABLE) == {
        "train.py": TRAIN.replace("DEPTH = 4", "DEPTH = 8")
    }


def test_stale_unified_diff_is_refused(ws: Path) -> None:
    diff = unified_diff({"train.py": TRAIN}, {"train.py": TRAIN.replace("LR = 0.01", "LR = 0.1")})
    (ws / "train.py").write_text(TRAIN.replace("LR = 0.01", "LR = 0.003"))
    with pytest.raises(EditError, match="does not apply to the current files"):
        apply_patch(ws, diff, "unified_diff", EDITABLE)
    assert (ws / "train.py").read_text() == TRAIN.replace("LR = 0.01", "LR = 0.003")


def test_unified_diff_on_the_harness_or_deleting_is_refused(ws: Path) -> None:
    harness = unified_diff({"prepare.py": "a\n"}, {"prepare.py": "b\n"})
    with pytest.raises(EditError, match="prepare.py is not editable"):
        apply_patch(ws, harness, "unified_diff", EDITABLE)
    with pytest.raises(EditError, match="deleting files is not supported"):
        apply_patch(ws, unified_diff({"train.py": TRAIN}, {}), "unified_diff", EDITABLE)
    with pytest.raises(EditError, match="no file headers"):
        apply_patch(ws, "@@ -1 +1 @@\n-a\n+b\n", "unified_diff", EDITABLE)


def test_is_editable_follows_glob_semantics() -> None:
    assert is_editable("train.py", ["*.py"])
    assert not is_editable("sub/train.py", ["*.py"])  # `*` stays in one directory, as Path.glob does
    assert is_editable("sub/deeper/train.py", ["**/*.py"])
    assert is_editable("train.py", ["**/*.py"])  # `**` matches zero directories too
    assert is_editable("models/x.py", ["models/**"])
    assert is_editable("./train.py", ["train.py"])
    assert is_editable("cfg_1.py", ["cfg_[0-9].py"]) and not is_editable("cfg_a.py", ["cfg_[!a-z].py"])
    assert not is_editable("../train.py", ["**"])
    assert not is_editable("prepare.py", ["train.py", "models/**"])
