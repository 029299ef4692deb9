"""The memory planner: its predictions against measured peaks on small models, `nightlab plan`, and
`nightlab serve` refusing a base the planner says will not fit."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.train import models, planner
from nightlab.train.engine import Engine, EngineError

# (hidden, intermediate, layers, heads, kv heads, vocab) of the measured models: GQA like the catalogue
SHAPES = {
    "none": (256, 768, 3, 4, 2, 4096),
    "nf4": (256, 704, 3, 4, 2, 2048),
    "int8": (256, 704, 3, 4, 2, 2048),
}
TRAIN = {"rank": 8, "seq": 256, "batch": 2}
SAMPLE = {"prompts": 8, "prompt": 96, "completion": 32}


def _build(directory: Path, tokenizer_dir: Path, shape: tuple[int, ...]) -> Path:
    """A random Llama from a config, with the tiny model's tokenizer (ids past it are never used)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True)
    for item in tokenizer_dir.iterdir():
        if item.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(item, directory / item.name)
    hidden, intermediate, layers, heads, kv_heads, vocab = shape
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _status(field: str) -> int:
    kib = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert kib is not None
    return int(kib.group(1)) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def measure(model_dir: str, warm_dir: str, quant: str, data_dir: str) -> dict[str, int]:
    """Peak bytes of sampling, then of two training steps, through the engine (run in a fresh process).

    Each is the model's tensor bytes plus the RSS peak above the loaded model: code and libraries loaded on
    first use are warmed up on another model first, and the weights are touched before the baseline
    (safetensors maps them lazily)."""
    import numpy as np
    import torch

    from nightlab.train.engine import AdamParams, Datum, LoraSpec
    from nightlab.train.sampling import SampleRequest, SamplingParams

    engine = Engine(Path(data_dir), device="cpu", quantization={model_dir: quant, warm_dir: quant})
    rng = np.random.default_rng(0)

    def tokens(n: int) -> list[int]:
        return rng.integers(3, 400, n).tolist()

    def run(
        name: str, prompts: int, prompt: int, completion: int, rank: int, seq: int, batch: int
    ) -> tuple[int, int]:
        params = SamplingParams(max_tokens=completion, stop_at_eos=False, seed=0)
        gc.collect()
        _reset_peak()
        start = _status("VmRSS")
        engine.sample(name, None, [SampleRequest(tokens(prompt), params) for _ in range(prompts)])
        sampled = _status("VmHWM") - start
        engine.create_adapter(name, name, LoraSpec(rank=rank, seed=0))
        data = []
        for _ in range(batch):
            ids = tokens(seq + 1)
            data.append(Datum(ids[:-1], {"target_tokens": ids[1:], "weights": np.ones(seq, np.float32)}))
        gc.collect()
        _reset_peak()
        for _ in range(2):  # the second step holds AdamW's moments
            engine.forward_backward(name, data, "cross_entropy", None)
            engine.optim_step(name, AdamParams(learning_rate=1e-3))
        return sampled, _status("VmHWM") - start

    run(warm_dir, 2, 8, 4, 4, 16, 2)
    model = engine._base(model_dir).model
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():  # bitsandbytes keeps block scales beside the 4-bit codes
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, *((state.state2.absmax,) if state.nested else ())]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}
    with torch.no_grad():
        for t in tensors:
            t.float().sum()  # fault in every page of weights mapped from the file
    sampled, trained = run(model_dir, *SAMPLE.values(), *TRAIN.values())
    weight_bytes = sum(storage.nbytes() for storage in storages.values())
    return {"weights": weight_bytes, "sampling": weight_bytes + sampled, "training": weight_bytes + trained}


@pytest.mark.parametrize("quant", ["none", "nf4", "int8"])
def test_prediction_within_15_percent_of_measured_peak(quant, tiny_model_dir, tmp_path):
    if quant != "none":
        pytest.importorskip("bitsandbytes")
    model_dir = _build(tmp_path / "model", tiny_model_dir, SHAPES[quant])
    code = (
        "import json, sys; from tests.train.test_planner import measure; "
        "print(json.dumps(measure(*sys.argv[1:])))"
    )
    # glibc keeps freed heap memory (RSS never drops) unless blocks are mmapped: with a fixed threshold freed
    # tensors go back to the OS, so the RSS peak is the peak of live memory, which is what the planner counts
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    args = [str(model_dir), str(tiny_model_dir), quant, str(tmp_path / "data")]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])

    arch = planner.architecture_of_resolved(models.resolve(str(model_dir), tmp_path))
    train = planner.training(arch, planner.Workload(**TRAIN, quant=quant, device="cpu"))
    prompts, prompt, completion = SAMPLE.values()
    work = planner.Workload(
        rank=TRAIN["rank"], seq=prompt + completion, batch=prompts, quant=quant, device="cpu"
    )
    sample = planner.sampling(arch, work)
    predicted = {
        "weights": sample.weights,
        "training": train.total,
        "sampling": sample.total - sample.adapters,  # sampled from the base alone here
    }
    for key, value in predicted.items():
        assert abs(value - measured[key]) <= 0.15 * measured[key], (key, value, measured)


@pytest.mark.parametrize("family", [None, "qwen3_moe", "mixtral"])
def test_parameter_and_lora_counts_match_the_engines(family, tiny_model_dir, tmp_path):
    from nightlab.train.engine import LoraSpec
    from nightlab.train.tiny_moe import make_tiny_moe_model

    name = str(tiny_model_dir if family is None else make_tiny_moe_model(tmp_path / "moe", family))
    engine = Engine(tmp_path, device="cpu", show_progress=False)
    engine.create_adapter("a", name, LoraSpec(rank=4, seed=0))
    adapter = engine._adapters["a"]
    arch = planner.architecture_of_resolved(models.resolve(name, tmp_path))
    assert sum(p.numel() for p in adapter.params.values()) == planner.lora_parameters(arch, 4)
    base = sum(p.numel() for n, p in adapter.base.peft.named_parameters() if "lora_" not in n)
    assert abs(arch.total_parameters() - base) <= 0.005 * base  # q/k norms are not counted


def test_catalogue_matches_published_parameter_counts():
    published = {
        "Llama-3.1-8B": 8.03e9,
        "Llama-3.3-70B": 70.6e9,
        "Qwen3-8B": 8.19e9,
        "Qwen3-235B-A22B": 235e9,
    }
    for name, count in published.items():
        assert abs(planner.CATALOGUE[name].total_parameters() - count) < 0.01 * count, name


def test_quantization_and_checkpointing_shrink_what_they_should():
    arch = planner.CATALOGUE["Llama-3.3-70B"]
    full, nf4 = (
        planner.training(arch, planner.Workload()),
        planner.training(arch, planner.Workload(quant="nf4")),
    )
    assert nf4.weights < 0.3 * full.weights and nf4.activations == full.activations
    checkpointed = planner.training(arch, planner.Workload(quant="nf4", gradient_checkpointing=True))
    assert checkpointed.activations < nf4.activations / 10 and checkpointed.weights == nf4.weights
    longer = planner.training(arch, planner.Workload(seq=4096, batch=4))
    assert planner.training_tokens(planner.Workload(seq=4096, batch=4)) == 4096  # one sequence per microbatch
    assert longer.activations == 2 * full.activations


def test_plan_cli_help_and_breakdown(tiny_model_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--help"])
    assert result.exit_code == 0
    for option in ("--rank", "--seq", "--batch", "--quant", "--device", "--machine"):
        assert option in result.output

    result = runner.invoke(app, ["plan", "Llama-3.3-70B", "--quant", "nf4", "--machine", "dgx-spark"])
    assert result.exit_code == 0, result.output
    need = planner.training(planner.CATALOGUE["Llama-3.3-70B"], planner.Workload(quant="nf4"))
    assert planner.gib(need.total) in result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.count("│") > 3}
    assert "fits" in rows["Llama-3.3-70B"].split("│")[3] and "no" in rows["Qwen3-235B-A22B"].split("│")[3]

    result = runner.invoke(app, ["plan", str(tiny_model_dir), "--device", "cpu", "--seq", "64"])
    assert result.exit_code == 0, result.output
    arch = planner.architecture_of_resolved(models.resolve(str(tiny_model_dir), tiny_model_dir))
    assert arch.hidden == 64 and arch.layers == 2

    result = runner.invoke(app, ["plan", "Llama-3.1-8B", "--machine", "toaster"])
    assert result.exit_code == 1 and "dgx-spark" in result.output


def test_engine_refuses_a_base_that_will_not_fit_without_loading_it(tiny_model_dir, tmp_path):
    engine = Engine(tmp_path, device="cpu", memory_limit=1 << 20, show_progress=False)
    with pytest.raises(EngineError, match=r"will not fit: .* needs \d+\.\d\d GiB at peak \(weights"):
        engine.model_info(str(tiny_model_dir))
    assert engine.loaded() == []


def test_serve_refuses_a_base_the_planner_says_will_not_fit(tiny_model_dir, tmp_path):
    arch = planner.architecture_of_resolved(models.resolve(str(tiny_model_dir), tmp_path))
    need = planner.training(arch, planner.Workload(quant="nf4", device="cpu"))
    limit_gb = need.total / planner.GIB  # fits only without the planner's headroom
    args = ["serve", "--data-dir", str(tmp_path), "--device", "cpu", "--preload", str(tiny_model_dir)]
    quantized = [*args, "--quantize", f"{tiny_model_dir}=nf4"]
    result = CliRunner().invoke(app, [*quantized, "--memory-limit-gb", str(limit_gb)])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "will not fit" in message and f"needs {planner.gib(need.total)} GiB" in message, message
    assert "nf4" in message and "--quantize" in message

    result = CliRunner().invoke(app, [*args, "--quantize", "nf4"])
    assert result.exit_code == 2 and "expected MODEL=nf4" in result.output
