"""The engine on the tiny model: SFT learns, gradients accumulate, adapters stay apart, checkpoints load."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from nightlab import hardware
from nightlab.train.engine import AdamParams, Datum, Engine, EngineError, LoraSpec
from nightlab.train.forward import TOKENS_PER_MICROBATCH, Checked, microbatches

ADAM = AdamParams(learning_rate=5e-3)
_ids = itertools.count()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    # fp32 so that equalities below are exact up to float rounding, not bf16 noise
    return Engine(tmp_path_factory.mktemp("data"), device="cpu", precision="fp32", show_progress=False)


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> str:
    return str(tiny_model_dir)


def sft_datum(engine: Engine, base: str, text: str, weight: float = 1.0) -> Datum:
    ids = engine.tokenizer(base)(text).input_ids
    weights = np.full(len(ids) - 1, weight, dtype=np.float32)
    return Datum(tokens=ids[:-1], loss_fn_inputs={"target_tokens": np.array(ids[1:]), "weights": weights})


@pytest.fixture(scope="module")
def batch(engine: Engine, base: str) -> list[Datum]:
    texts = [
        "the answer is 12 + 30 = 42.",
        "what is the sum of 7 and 5? it is 12.",
        "so the number equals 99",
    ]
    return [sft_datum(engine, base, t) for t in texts]


def new_adapter(engine: Engine, base: str, seed: int | None = 0, rank: int = 4) -> str:
    model_id = f"m{next(_ids)}"
    engine.create_adapter(model_id, base, LoraSpec(rank=rank, seed=seed))
    return model_id


def grads(engine: Engine, model_id: str) -> dict[str, torch.Tensor | None]:
    params = engine._adapter(model_id).params
    return {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}


def probe_loss(engine: Engine, model_id: str, data: list[Datum]) -> float:
    return engine.forward_backward(model_id, data, "cross_entropy", None, forward_only=True).metrics[
        "loss:sum"
    ]


def train(engine: Engine, model_id: str, data: list[Datum], steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(engine.forward_backward(model_id, data, "cross_entropy", None).metrics["loss:sum"])
        engine.optim_step(model_id, ADAM)
    return out


def test_auto_device_is_the_one_nightlab_hardware_reports(tmp_path):
    assert Engine(tmp_path, show_progress=False).device == (hardware.accelerator() or "cpu")


def test_microbatches_bound_the_padded_tokens_and_keep_every_datum_in_order():
    sizes = [3000, 1000, 1000, 5000, 10, 2000, 2000]
    data = [Checked(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), {}) for n in sizes]
    batches = list(microbatches(data))
    assert [i for batch in batches for i in batch] == list(range(len(sizes)))
    assert all(len(b) == 1 or max(sizes[i] for i in b) * len(b) <= TOKENS_PER_MICROBATCH for b in batches)
    assert [len(b) for b in batches] == [1, 2, 1, 2, 1]  # a datum over the bound still gets a batch alone


def test_sft_loss_falls(engine, base, batch):
    model_id = new_adapter(engine, base)
    losses = train(engine, model_id, batch, 6)
    assert losses[-1] < 0.8 * losses[0], losses
    result = engine.forward_backward(model_id, batch, "cross_entropy", None, forward_only=True)
    assert result.metrics["num_sequences:sum"] == 3
    for datum, out in zip(batch, result.outputs, strict=True):
        assert out["logprobs"].shape == (len(datum.tokens),)
        assert np.all(out["logprobs"] <= 0)
        np.testing.assert_allclose(out["elementwise_loss"], -out["logprobs"], rtol=1e-6)


def test_logprobs_match_a_plain_transformers_forward(engine, base, batch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model_id = new_adapter(engine, base)
    result = engine.forward_backward(model_id, batch, "cross_entropy", None, forward_only=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for datum, out in zip(batch, result.outputs, strict=True):
        with torch.no_grad():
            logits = reference(torch.tensor([datum.tokens])).logits[0]
        expected = torch.log_softmax(logits, -1).gather(
            -1, torch.tensor(datum.loss_fn_inputs["target_tokens"])[:, None]
        )
        np.testing.assert_allclose(out["logprobs"], expected[:, 0].numpy(), atol=1e-5)


def test_forward_only_changes_neither_weights_nor_grads(engine, base, batch):
    model_id = new_adapter(engine, base)
    train(engine, model_id, batch, 1)
    engine.forward_backward(model_id, batch[:1], "cross_entropy", None)
    before_grads = grads(engine, model_id)
    before_weights = {k: p.detach().clone() for k, p in engine._adapter(model_id).params.items()}
    first = probe_loss(engine, model_id, batch)
    assert probe_loss(engine, model_id, batch) == first
    for key, param in engine._adapter(model_id).params.items():
        assert torch.equal(param.detach(), before_weights[key])
        assert (param.grad is None and before_grads[key] is None) or torch.equal(
            param.grad, before_grads[key]
        )


def test_gradient_accumulation_across_calls_equals_one_call(engine, base, batch):
    split, joint = new_adapter(engine, base, seed=7), new_adapter(engine, base, seed=7)
    train(engine, split, batch, 1)  # nonzero LoRA B first, so every LoRA matrix gets a gradient
    train(engine, joint, batch, 1)
    a = engine.forward_backward(split, batch[:1], "cross_entropy", None).metrics["loss:sum"]
    b = engine.forward_backward(split, batch[1:], "cross_entropy", None).metrics["loss:sum"]
    both = engine.forward_backward(joint, batch, "cross_entropy", None).metrics["loss:sum"]
    assert a + b == pytest.approx(both, rel=1e-5)
    g_split, g_joint = grads(engine, split), grads(engine, joint)
    assert all(g is not None for g in g_joint.values())
    for key, g in g_joint.items():
        torch.testing.assert_close(g_split[key], g, rtol=1e-4, atol=1e-6)


def test_same_seed_same_init_different_seed_differs(engine, base, batch):
    a, b, c = (
        new_adapter(engine, base, seed=3),
        new_adapter(engine, base, seed=3),
        new_adapter(engine, base, seed=4),
    )
    for model_id in (a, b, c):
        train(engine, model_id, batch, 1)
    assert probe_loss(engine, a, batch) == probe_loss(engine, b, batch)
    assert probe_loss(engine, a, batch) != probe_loss(engine, c, batch)


def test_two_adapters_on_one_base_do_not_interfere(engine, base, batch):
    data_a, data_b = batch[:2], batch[2:]
    solo_a, solo_b = new_adapter(engine, base, seed=1), new_adapter(engine, base, seed=2, rank=8)
    expected_a, expected_b = train(engine, solo_a, data_a, 3), train(engine, solo_b, data_b, 3)
    a, b = new_adapter(engine, base, seed=1), new_adapter(engine, base, seed=2, rank=8)
    got_a, got_b = [], []
    for _ in range(3):  # interleaved: A's grads sit accumulated while B runs forward, backward and a step
        got_a.append(engine.forward_backward(a, data_a, "cross_entropy", None).metrics["loss:sum"])
        got_b.append(engine.forward_backward(b, data_b, "cross_entropy", None).metrics["loss:sum"])
        engine.optim_step(b, ADAM)
        engine.optim_step(a, ADAM)
    assert got_a == pytest.approx(expected_a, rel=1e-5)
    assert got_b == pytest.approx(expected_b, rel=1e-5)
    assert expected_a[-1] < expected_a[0] and expected_b[-1] < expected_b[0]


def test_save_load_round_trip(engine, base, batch, tmp_path):
    original = new_adapter(engine, base)
    train(engine, original, batch, 2)
    engine.save_adapter(original, tmp_path / "with", with_optimizer=True)
    engine.save_adapter(original, tmp_path / "without", with_optimizer=False)
    assert not (tmp_path / "without" / "optimizer.pt").exists()
    engine.load_adapter("restored-full", base, tmp_path / "with", with_optimizer=True)
    engine.load_adapter("restored-weights", base, tmp_path / "without", with_optimizer=False)
    assert engine.adapter_info("restored-full") == (engine.model_info(base).name, LoraSpec(rank=4, seed=0))

    next_losses = {m: train(engine, m, batch, 1)[0] for m in (original, "restored-full", "restored-weights")}
    assert next_losses["restored-full"] == next_losses[original]
    assert next_losses["restored-weights"] == next_losses[original]
    after = {m: probe_loss(engine, m, batch) for m in next_losses}
    assert after["restored-full"] == pytest.approx(after[original], rel=1e-6)
    assert after["restored-weights"] != pytest.approx(
        after[original], rel=1e-6
    )  # fresh Adam moments step differently

    with pytest.raises(EngineError, match="no optimizer state"):
        engine.load_adapter("nope", base, tmp_path / "without", with_optimizer=True)


def test_saving_twice_to_one_path_replaces_the_checkpoint(engine, base, batch, tmp_path):
    model_id = new_adapter(engine, base)
    engine.save_adapter(model_id, tmp_path / "ckpt", with_optimizer=True)
    train(engine, model_id, batch, 1)
    engine.save_adapter(model_id, tmp_path / "ckpt", with_optimizer=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not (tmp_path / "ckpt" / "optimizer.pt").exists()
    engine.load_adapter("replaced", base, tmp_path / "ckpt", with_optimizer=False)
    assert probe_loss(engine, "replaced", batch) == probe_loss(engine, model_id, batch)


def test_drop_adapter(engine, base, batch):
    model_id = new_adapter(engine, base)
    engine.drop_adapter(model_id)
    with pytest.raises(EngineError, match="unknown model_id"):
        engine.forward_backward(model_id, batch, "cross_entropy", None)
    other = new_adapter(engine, base)
    assert probe_loss(engine, other, batch) > 0


def test_dropping_the_last_adapter_leaves_the_base_servable(tiny_model_dir, tmp_path, batch):
    """A server whose only training client finished must still sample the base model and take new clients."""
    from nightlab.train.sampling import SampleRequest, SamplingParams

    fresh = Engine(tmp_path / "data", device="cpu", precision="fp32", show_progress=False)
    base = str(tiny_model_dir)
    request = SampleRequest(list(batch[0].tokens[:4]), SamplingParams(max_tokens=4, temperature=0.0))
    before = fresh.sample(base, None, [request])[0].sequences[0]
    model_id = new_adapter(fresh, base)
    train(fresh, model_id, batch, 2)
    fresh.drop_adapter(model_id)
    after = fresh.sample(base, None, [request])[0].sequences[0]
    assert after.tokens == before.tokens
    np.testing.assert_allclose(after.logprobs, before.logprobs, atol=1e-5)
    assert probe_loss(fresh, new_adapter(fresh, base), batch) > 0


def test_bf16_autocast_keeps_logprobs_close(tiny_model_dir, tmp_path, batch):
    bf16 = Engine(tmp_path, device="cpu", precision="bf16", show_progress=False)
    fp32 = Engine(tmp_path, device="cpu", precision="fp32", show_progress=False)
    outs = []
    for eng in (bf16, fp32):
        eng.create_adapter("x", str(tiny_model_dir), LoraSpec(rank=4, seed=0))
        outs.append(eng.forward_backward("x", batch, "cross_entropy", None).outputs)
    for low, full in zip(*outs, strict=True):
        np.testing.assert_allclose(low["logprobs"], full["logprobs"], atol=0.05)


def test_rl_losses_run_through_the_engine(engine, base, batch):
    model_id = new_adapter(engine, base)
    datum = batch[0]
    size = len(datum.tokens)
    sampled = engine.forward_backward(model_id, [datum], "cross_entropy", None, forward_only=True).outputs[0]
    inputs = {
        "target_tokens": datum.loss_fn_inputs["target_tokens"],
        "logprobs": sampled["logprobs"],
        "advantages": np.linspace(-1, 1, size).astype(np.float32),
    }
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"):
        result = engine.forward_backward(model_id, [Datum(datum.tokens, inputs)], loss_fn, None)
        assert np.isfinite(result.metrics["loss:sum"]), loss_fn
        np.testing.assert_allclose(result.outputs[0]["logprobs"], sampled["logprobs"], atol=1e-5)
    engine.optim_step(model_id, ADAM)


def test_soft_targets_through_the_engine(engine, base, batch):
    model_id = new_adapter(engine, base)
    datum = batch[0]
    hard = datum.loss_fn_inputs["target_tokens"]
    targets = np.stack([hard, np.zeros_like(hard)], axis=1)
    weights = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (len(hard), 1))
    soft = engine.forward_backward(
        model_id, [Datum(datum.tokens, {"target_tokens": targets, "weights": weights})], "cross_entropy", None
    )
    assert soft.outputs[0]["logprobs"].shape == (len(hard), 2)
    assert soft.metrics["loss:sum"] == pytest.approx(probe_loss(engine, model_id, [datum]), rel=1e-5)


def test_user_errors_are_clear_and_lose_nothing(engine, base, batch):
    model_id = new_adapter(engine, base)
    good = batch[0]
    engine.forward_backward(model_id, [good], "cross_entropy", None)
    before = grads(engine, model_id)
    short = Datum(good.tokens, {"target_tokens": good.loss_fn_inputs["target_tokens"][:-1]})
    outside = Datum([10**6], {"target_tokens": np.array([1])})
    cases = [
        (lambda: engine.model_info("definitely not a model"), "unknown model"),
        (lambda: engine.forward_backward(model_id, batch, "hinge", None), "unknown loss_fn 'hinge'"),
        (lambda: engine.forward_backward(model_id, [good, short], "cross_entropy", None), "datum 1"),
        (
            lambda: engine.forward_backward(model_id, [good, outside], "cross_entropy", None),
            "outside the vocabulary",
        ),
        (lambda: engine.forward_backward(model_id, [good], "ppo", None), "needs loss_fn_inputs['logprobs']"),
        (lambda: engine.forward_backward(model_id, [good], "ppo", {"eps": 1.0}), "no config key 'eps'"),
        (lambda: engine.forward_backward(model_id, [], "cross_entropy", None), "at least one datum"),
        (lambda: engine.forward_backward("ghost", [good], "cross_entropy", None), "unknown model_id 'ghost'"),
        (lambda: engine.create_adapter(model_id, base, LoraSpec()), "already exists"),
        (
            lambda: engine.create_adapter(
                "z", base, LoraSpec(train_attn=False, train_mlp=False, train_unembed=False)
            ),
            "trains nothing",
        ),
        (lambda: engine.create_adapter("z", base, LoraSpec(rank=0)), "positive integer"),
    ]
    for call, message in cases:
        with pytest.raises(EngineError) as info:
            call()
        assert info.value.category == "User"
        assert message in str(info.value)
    after = grads(engine, model_id)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_an_uncached_hub_id_fails_without_touching_the_network(engine, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is off limits in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(EngineError, match="cannot load model") as info:
        engine.model_info("no/such-model-here-xyz-not-cached")
    assert info.value.category == "User" and attempts == []


def test_check_sample_refuses_what_the_model_cannot_serve(engine, base):
    from nightlab.train.sampling import SampleRequest, SamplingParams

    context = engine.model_info(base).max_context_length
    engine.check_sample(base, SampleRequest([1, 2], SamplingParams(max_tokens=4)))
    for request, message in (
        (SampleRequest([10**6], SamplingParams()), "outside the vocabulary"),
        (SampleRequest([1], SamplingParams(max_tokens=context)), "exceeds the model's context length"),
        (SampleRequest([1], SamplingParams(top_p=0)), "top_p"),
    ):
        with pytest.raises(EngineError, match=message) as info:
            engine.check_sample(base, request)
        assert info.value.category == "User"


def test_sample_from_base_and_from_a_checkpoint(engine, base, batch, tmp_path):
    from nightlab.train.sampling import SampleRequest, SamplingParams

    model_id = new_adapter(engine, base, rank=8)
    train(engine, model_id, batch, 3)
    engine.save_adapter(model_id, tmp_path / "sampler", with_optimizer=False)

    prompt = list(batch[0].tokens[:4])
    stop = [engine.tokenizer(base).pad_token_id]
    request = SampleRequest(prompt, SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=stop))
    tuned = engine.sample(base, tmp_path / "sampler", [request])[0].sequences[0]
    plain = engine.sample(base, None, [request])[0].sequences[0]
    assert not np.allclose(
        tuned.logprobs[: len(plain.logprobs)], plain.logprobs[: len(tuned.logprobs)], atol=1e-3
    )

    # the checkpoint's samples score the same under the training adapter's forward pass
    sequence = prompt + tuned.tokens
    scored = Datum(sequence[:-1], {"target_tokens": np.array(sequence[1:])})
    trained = engine.forward_backward(model_id, [scored], "cross_entropy", None, forward_only=True).outputs[0]
    np.testing.assert_allclose(tuned.logprobs, trained["logprobs"][len(prompt) - 1 :], atol=1e-4)
    with pytest.raises(EngineError, match="not a nightlab adapter checkpoint"):
        engine.sample(base, tmp_path, [request])
    loaded = engine.stats().sampler_adapters
    engine.forget_samplers(tmp_path)  # its files are about to go: the adapter loaded from them goes first
    assert engine.stats().sampler_adapters == loaded - 1
