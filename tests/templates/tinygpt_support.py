"""Shared pieces for the tinygpt template tests: a small corpus, a workspace copy, and running its scripts."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

TEMPLATE = Path(__file__).resolve().parents[2] / "nightlab" / "templates" / "tinygpt"
VOCAB = 320  # 256 byte tokens + BOS + a few dozen merges: enough to learn, quick to train
TINY = {  # a model small enough that a run takes a few seconds on a busy CPU
    "TINYGPT_DEPTH": "1",
    "TINYGPT_WIDTH": "32",
    "TINYGPT_HEAD_DIM": "16",
    "TINYGPT_BATCH_SIZE": "4",
    "NIGHTLAB_BUDGET_SECONDS": "2",
}
WORDS = [
    "the",
    "king",
    "queen",
    "lord",
    "lady",
    "crown",
    "sword",
    "night",
    "day",
    "love",
    "death",
    "fair",
    "foul",
    "speak",
    "hear",
    "thou",
    "thee",
    "naïve",
    "café",
    "größe",
    "日本語",
    "東京",
    "😀",
]


def write_corpus(folder: Path, files: int = 12, lines: int = 60, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text with multi-byte characters, one .txt file per document; returns the texts."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(files):
        text = "".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".\n" for _ in range(lines)
        )
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def env_for(cache: Path, data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYGPT_", "NIGHTLAB_"))}
    env.update(NIGHTLAB_CACHE_DIR=str(cache), TINYGPT_DATA=str(data), TINYGPT_VOCAB_SIZE=str(VOCAB))
    env.update(extra)
    return env


def make_workspace(root: Path) -> Path:
    """A copy of the template as `nightlab init` would make it: its own git repository."""
    ws = root / "ws"
    shutil.copytree(TEMPLATE, ws, ignore=shutil.ignore_patterns("__pycache__", "run"))
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    return ws


def run_py(
    ws: Path, args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=timeout
    )


def load_prepare(monkeypatch, cache: Path, data: Path) -> ModuleType:
    """The template's prepare.py as a module, pointed at a test cache and corpus."""
    monkeypatch.syspath_prepend(str(TEMPLATE))  # prepare.py imports corpus.py from its own folder
    monkeypatch.setenv("NIGHTLAB_CACHE_DIR", str(cache))
    monkeypatch.setenv("TINYGPT_DATA", str(data))
    monkeypatch.setenv("TINYGPT_VOCAB_SIZE", str(VOCAB))
    spec = importlib.util.spec_from_file_location("tinygpt_prepare", TEMPLATE / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def summary(stdout: str) -> dict[str, float]:
    """The `name: value` lines after the last `---`, as numbers (raises if one is not a number)."""
    tail = stdout.rsplit("\n---\n", 1)[1]
    out = {}
    for line in tail.splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = line.split(":", 1)
            out[name.strip()] = float(value)
    return out
