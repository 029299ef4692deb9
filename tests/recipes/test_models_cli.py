"""`nightlab models pull HUB_ID` without the network: the hub id is served from a local Hugging Face cache.

The command runs as a real process with the hub offline and its cache pointed at a directory laid out as the
hub client writes it (`models--org--name/refs/main` naming a snapshot), so everything after the download is
real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(model_dir: Path, hub_id: str, cache: Path) -> Path:
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def test_pull_saves_a_prepared_model_that_loads_offline(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = hub_cache_with(tiny_model, "acme/tiny-chat", tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nightlab.cli",
            "models",
            "pull",
            "acme/tiny-chat",
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pulled = Path(done.stdout.strip().splitlines()[-1].removeprefix("use it as model_name: "))
    assert pulled == (tmp_path / "d" / "models" / "acme--tiny-chat").resolve()
    assert json.loads((pulled / "nightlab_model.json").read_text())["source"] == "hub"

    tokenizer = AutoTokenizer.from_pretrained(pulled)
    model = AutoModelForCausalLM.from_pretrained(pulled)
    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    assert torch.equal(model(ids).logits, original(ids).logits)  # the same weights, behind the same tokenizer
    assert tokenizer.eos_token_id == model.config.eos_token_id is not None
