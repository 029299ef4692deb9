"""tinygpt's train.py in pieces: every parameter is optimised, and a NaN loss stops the run at once."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

from tests.templates.tinygpt_support import (
    TEMPLATE,
    TINY,
    env_for,
    load_prepare,
    make_workspace,
    run_py,
    write_corpus,
)


@pytest.fixture
def train_module(monkeypatch, tmp_path):
    """train.py imported as a module (its settings and classes), next to the template's prepare.py."""
    load_prepare(monkeypatch, tmp_path / "cache", tmp_path / "corpus")
    monkeypatch.setitem(sys.modules, "prepare", sys.modules["tinygpt_prepare"])
    spec = importlib.util.spec_from_file_location("tinygpt_train", TEMPLATE / "train.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_every_parameter_has_exactly_one_optimizer_even_one_the_agent_adds(train_module):
    cfg = train_module.GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_embd=32, head_dim=16)
    model = train_module.GPT(cfg)
    model.out_gain = torch.nn.Parameter(torch.ones(32))  # what an agent might add
    model.blocks[0].attn.register_parameter("bias", torch.nn.Parameter(torch.zeros(32)))
    optimizers = train_module.build_optimizers(model, fast_bf16=False)
    owned = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    assert len(owned) == len(set(owned))


def test_a_nan_loss_ends_the_run_with_fail_at_the_first_step(tmp_path):
    write_corpus(tmp_path / "corpus")
    ws = make_workspace(tmp_path)
    env = env_for(tmp_path / "cache", tmp_path / "corpus", **TINY)
    assert run_py(ws, ["prepare.py"], env).returncode == 0
    done = run_py(ws, ["train.py"], {**env, "TINYGPT_SOFTCAP": "nan", "NIGHTLAB_PHASE": "train"})
    assert done.returncode == 1
    assert re.search(r"^FAIL: loss is nan at step 0 \(diverged\)", done.stdout, re.MULTILINE)
    assert not (ws / "run" / "checkpoint.pt").exists()
