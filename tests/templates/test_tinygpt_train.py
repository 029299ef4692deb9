"""tinygpt's train.py in pieces: every parameter is optimised, and a NaN loss stops the run at once."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_hand_written_loss_equals_cross_entropy_of_the_capped_logits(train_module, dtype):
    """Loss and gradient with a backward scale that is not 1, over 300 rows of a 2048-token vocabulary: chunks
    of 128 rows, so two full chunks and a partial one."""
    torch.manual_seed(0)
    logits = (torch.randn(300, 2048) * 20).to(dtype).requires_grad_()  # many logits far past the cap
    targets = torch.randint(0, 2048, (300,))
    expected = F.cross_entropy(15 * torch.tanh(logits.float() / 15), targets)
    (3 * expected).backward()
    expected_grad, logits.grad = logits.grad.float(), None
    loss = train_module.SoftcappedCrossEntropy.apply(logits, targets, 15.0)
    (3 * loss).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logits.grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 keeps 8 bits of mantissa
    assert torch.allclose(
        logits.grad.float(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max()
    )


def test_the_hand_written_qk_norm_and_rotation_match_their_plain_form(train_module):
    torch.manual_seed(0)
    T, D = 16, 8
    model = train_module.GPT(
        train_module.GPTConfig(vocab_size=32, seq_len=T, n_layer=1, n_embd=16, head_dim=D)
    )
    x = torch.randn(2, 3, T, D, dtype=torch.float64, requires_grad=True)
    cos, sin = model.cos.double(), model.sin.double()
    angles = torch.outer(torch.arange(T, dtype=torch.float64), 10000.0 ** (-torch.arange(0, D, 2) / D))
    normed = F.rms_norm(x, (D,))
    x1, x2 = normed[..., : D // 2], normed[..., D // 2 :]
    plain = torch.cat((x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()), dim=-1)
    assert torch.allclose(train_module.NormRotary.apply(x, cos, sin), plain, atol=1e-6)
    assert torch.autograd.gradcheck(lambda t: train_module.NormRotary.apply(t, cos, sin), (x,))


def test_the_hand_written_relu_squared_matches_its_plain_form(train_module):
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.equal(train_module.ReluSquared.apply(x), F.relu(x).square())
    assert torch.autograd.gradcheck(train_module.ReluSquared.apply, (x,))
