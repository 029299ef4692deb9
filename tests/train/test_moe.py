"""The engine on tiny Mixture-of-Experts bases (Qwen3-MoE, OLMoE, Mixtral; fused 3-D experts): LoRA trains the
attention and every expert, routers stay frozen, checkpoints round-trip, sampling works, and each expert's
LoRA factors learn from the tokens routed to it and from no others."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nightlab.train.engine import Datum, Engine, LoraSpec
from nightlab.train.lora import LoadedBase, lora_targets
from nightlab.train.tiny_moe import MOE_FAMILIES, make_tiny_moe_model
from tests.train.test_engine import new_adapter, probe_loss, sft_datum, train

NUM_EXPERTS = 4
TEXTS = ["the answer is 12 + 30 = 42.", "what is the sum of 7 and 5? it is 12.", "so the number equals 99"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    # fp32 so that equalities below are exact up to float rounding
    return Engine(tmp_path_factory.mktemp("data"), device="cpu", precision="fp32", show_progress=False)


@pytest.fixture(scope="module", params=list(MOE_FAMILIES))
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    family = request.param
    return str(make_tiny_moe_model(tmp_path_factory.mktemp(family) / "tiny", family, num_experts=NUM_EXPERTS))


@pytest.fixture(scope="module")
def batch(engine: Engine, base: str) -> list[Datum]:
    return [sft_datum(engine, base, text) for text in TEXTS]


def loaded(engine: Engine, model_id: str) -> LoadedBase:
    return engine._adapter(model_id).base


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The MoE blocks by name: the modules holding fused experts, each with its router as `gate`."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "experts")}


def test_lora_covers_attention_and_every_expert_but_no_router(engine, base):
    model_id = new_adapter(engine, base, rank=4)
    targets = loaded(engine, model_id).targets
    blocks = moe_blocks(loaded(engine, model_id).model)
    assert len(blocks) == 2 and len(targets["attn"]) == 8
    assert sorted(targets["experts"]) == sorted(
        f"{block}.experts.{weight}" for block in blocks for weight in ("gate_up_proj", "down_proj")
    )
    params = engine._adapter(model_id).params
    assert all(re.search(r"\.(self_attn|experts|lm_head)\.", key) for key in params), "a router got LoRA"
    expert_factors = {k: p for k, p in params.items() if ".experts." in k}
    assert len(expert_factors) == 2 * 2 * 2  # blocks x fused weights x (A, B)
    for key, param in expert_factors.items():  # rank 4 for each expert
        assert param.shape[0 if "lora_A" in key else 1] == 4 * NUM_EXPERTS


def test_training_moves_the_loss_and_touches_only_lora(engine, base, batch):
    model_id = new_adapter(engine, base)
    model = loaded(engine, model_id).model
    routers = {name: block.gate.weight.detach().clone() for name, block in moe_blocks(model).items()}
    losses = train(engine, model_id, batch, 5)
    assert losses[-1] < 0.8 * losses[0], losses
    engine.forward_backward(model_id, batch, "cross_entropy", None)
    params = engine._adapter(model_id).params
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    frozen = {name: p for name, p in model.named_parameters() if "lora_" not in name}
    assert len(frozen) > len(routers) and all(p.grad is None and not p.requires_grad for p in frozen.values())
    for name, block in moe_blocks(model).items():
        assert block.gate.weight.grad is None
        assert torch.equal(block.gate.weight, routers[name])


def test_save_then_load_gives_identical_logits_in_nightlab_and_in_peft(engine, base, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_id = new_adapter(engine, base)
    train(engine, model_id, batch, 2)
    engine.save_adapter(model_id, tmp_path / "ckpt", with_optimizer=True)
    engine.load_adapter("restored-" + model_id, base, tmp_path / "ckpt", with_optimizer=True)
    outputs = {
        m: engine.forward_backward(m, batch, "cross_entropy", None, forward_only=True).outputs
        for m in (model_id, "restored-" + model_id)
    }
    for trained, restored in zip(*outputs.values(), strict=True):
        np.testing.assert_array_equal(restored["logprobs"], trained["logprobs"])
    assert train(engine, "restored-" + model_id, batch, 1) == train(engine, model_id, batch, 1)

    # the directory is a plain PEFT adapter: PEFT alone loads it onto the base and gives the same logits
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "ckpt").eval()
    datum = batch[0]
    with torch.no_grad():
        logits = plain(torch.tensor([datum.tokens])).logits[0]
    expected = torch.log_softmax(logits, -1).gather(
        -1, torch.tensor(datum.loss_fn_inputs["target_tokens"])[:, None]
    )
    np.testing.assert_allclose(outputs[model_id][0]["logprobs"], expected[:, 0].numpy(), atol=1e-5)


def test_sampling_from_an_moe_checkpoint(engine, base, batch, tmp_path):
    from nightlab.train.sampling import SampleRequest, SamplingParams

    model_id = new_adapter(engine, base)
    train(engine, model_id, batch, 3)
    engine.save_adapter(model_id, tmp_path / "sampler", with_optimizer=False)
    prompt = list(batch[0].tokens[:4])
    request = SampleRequest(prompt, SamplingParams(max_tokens=6, temperature=0.0))
    tuned = engine.sample(base, tmp_path / "sampler", [request])[0].sequences[0]
    plain = engine.sample(base, None, [request])[0].sequences[0]
    assert len(tuned.tokens) == 6 and len(plain.tokens) == 6
    assert not np.allclose(tuned.logprobs, plain.logprobs, atol=1e-3)
    sequence = prompt + tuned.tokens
    scored = Datum(sequence[:-1], {"target_tokens": np.array(sequence[1:])})
    trained = engine.forward_backward(model_id, [scored], "cross_entropy", None, forward_only=True).outputs[0]
    np.testing.assert_allclose(tuned.logprobs, trained["logprobs"][len(prompt) - 1 :], atol=1e-4)


def test_an_expert_learns_only_from_tokens_routed_to_it(engine, base, batch):
    """One token goes to 2 of the 4 experts of each block: the other two experts' factors get no gradient."""
    model_id = new_adapter(engine, base)
    train(engine, model_id, batch, 1)  # nonzero LoRA B, so the A factors of routed experts get gradient too
    blocks = moe_blocks(loaded(engine, model_id).model)
    routed: dict[str, set[int]] = {}
    hooks = [
        block.gate.register_forward_hook(
            lambda _module, _args, out, name=name: routed.setdefault(name, set()).update(
                out[2].flatten().tolist()
            )
        )
        for name, block in blocks.items()
    ]
    try:
        one_token = Datum(batch[0].tokens[:1], {"target_tokens": np.array(batch[0].tokens[1:2])})
        engine.forward_backward(model_id, [one_token], "cross_entropy", None)
    finally:
        for hook in hooks:
            hook.remove()
    assert {name: len(experts) for name, experts in routed.items()} == {name: 2 for name in blocks}

    params = engine._adapter(model_id).params
    factor_pairs = [
        (key, key.replace("lora_A", "lora_B")) for key in params if ".experts." in key and "lora_A" in key
    ]
    assert len(factor_pairs) == 2 * len(blocks)
    for key_a, key_b in factor_pairs:
        block = next(name for name in blocks if f".{name}.experts." in key_a)
        # PEFT's per-expert factors: A is (experts * rank, in), B is (out, rank * experts) interleaved
        grad_a = params[key_a].grad.view(NUM_EXPERTS, -1, params[key_a].shape[1])
        grad_b = params[key_b].grad.view(params[key_b].shape[0], -1, NUM_EXPERTS)
        for expert in range(NUM_EXPERTS):
            norms = grad_a[expert].norm().item(), grad_b[..., expert].norm().item()
            if expert in routed[block]:
                assert min(norms) > 0, (key_a, expert)
            else:
                assert norms == (0.0, 0.0), (key_a, expert)


def test_adapters_with_and_without_experts_share_one_moe_base(engine, base, batch):
    family = Path(base).parent.name
    attn_only, experts_only = f"attn-{family}", f"experts-{family}"
    engine.create_adapter(attn_only, base, LoraSpec(rank=4, seed=0, train_mlp=False))
    engine.create_adapter(experts_only, base, LoraSpec(rank=2, seed=0, train_attn=False, train_unembed=False))
    full = new_adapter(engine, base)
    assert not any(".experts." in key for key in engine._adapter(attn_only).params)
    assert all(".experts." in key for key in engine._adapter(experts_only).params)
    for model_id in (attn_only, experts_only, full):
        before = probe_loss(engine, model_id, batch)
        train(engine, model_id, batch, 2)
        assert probe_loss(engine, model_id, batch) < before, model_id
    kept = probe_loss(engine, full, batch)
    engine.drop_adapter(attn_only)
    engine.drop_adapter(experts_only)
    assert probe_loss(engine, full, batch) == kept


@pytest.mark.parametrize(
    ("family", "fields", "linear_routers"),
    [
        (
            "qwen2_moe",
            {"num_experts": NUM_EXPERTS, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16},
            ["model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"],
        ),
        (
            "deepseek_v2",
            {
                "n_routed_experts": NUM_EXPERTS,
                "moe_intermediate_size": 16,
                "first_k_dense_replace": 1,
                "q_lora_rank": None,
                "kv_lora_rank": 16,
                "qk_rope_head_dim": 4,
                "qk_nope_head_dim": 4,
                "v_head_dim": 8,
                "n_group": 1,
                "topk_group": 1,
            },
            ["model.layers.1.mlp.gate"],
        ),
    ],
)
def test_routers_that_are_linear_layers_stay_frozen(family, fields, linear_routers):
    """Some MoE families route with a plain linear layer: it must not join the mlp group with the experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts_per_tok=2,
        **fields,
    )
    model = AutoModelForCausalLM.from_config(config)
    targets = lora_targets(model)
    targeted = {name for group in targets.values() for name in group}
    assert not {t for t in targeted for router in linear_routers if t.startswith(router)}, "a router got LoRA"
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    # a transformers release may turn a linear router into a router module of its own (DeepSeek-V2's did)
    assert sorted(linear - targeted) == [name for name in linear_routers if name in linear]
    assert any("shared_expert" in name for name in targets["mlp"])
    assert len(targets["experts"]) == 2 * len(moe_blocks(model))
