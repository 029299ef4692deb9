"""Build small quadratic-template workspaces and replay patches for the loop's tests."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

from nightlab.research.workspace import init_workspace


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for nightlab.toml: nested tables of scalars and lists; knob ranges as inline tables."""
    lines: list[str] = []

    def table(prefix: str, body: dict[str, Any]) -> None:
        nested = {k: v for k, v in body.items() if isinstance(v, dict) and not {"low", "high"} <= set(v)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items() if k not in nested)
        for k, v in nested.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines) + "\n"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def commit_all(root: Path, message: str) -> None:
    git(root, "add", "--all")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", message)


def make_workspace(
    tmp: Path,
    *,
    config: dict[str, dict[str, Any]] | None = None,
    patches: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """A quadratic workspace in tmp/ws with config sections merged in, replay patches in tmp/patches.

    A config value of None removes that key. The sandbox is off unless asked for, so these tests exercise
    the loop itself on any machine.
    """
    root = init_workspace("quadratic", tmp / "ws")
    data = tomllib.loads((root / "nightlab.toml").read_text())
    data.setdefault("sandbox", {})["mode"] = "off"
    patch_dir = tmp / "patches"
    patch_dir.mkdir(exist_ok=True)
    data["proposer"]["replay"] = {"patches": str(patch_dir)}
    for section, values in (config or {}).items():
        target = data
        for part in section.split("."):
            target = target.setdefault(part, {})
        target.update(values)
        for key in [k for k, v in values.items() if v is None]:
            del target[key]
    (root / "nightlab.toml").write_text(dump_toml(data))
    for rel, text in (files or {}).items():
        (root / rel).write_text(text)
    commit_all(root, "test setup")
    for name, text in (patches or {}).items():
        (patch_dir / name).write_text(text)
    return root


def replace_block(old: str, new: str, path: str = "train.py", description: str | None = None) -> str:
    """A one-block search/replace patch, optionally with a `# description:` first line."""
    head = f"# description: {description}\n" if description else ""
    return f"{head}{path}\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"
