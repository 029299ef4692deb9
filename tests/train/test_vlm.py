"""Images in model inputs, end to end: the official tinker and openai clients against a real nightlab server
(uvicorn on 127.0.0.1) serving a tiny random Qwen2.5-VL."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import openai
import pytest
import tinker
from PIL import Image
from tinker import types
from transformers import Qwen2VLImageProcessorPil

from nightlab.train.tiny_vlm import make_tiny_vlm
from tests.train.test_tinker_api import ADAM, ALICE, Server


def picture(seed: int, size: int = 56, fmt: str = "PNG") -> bytes:
    """A random RGB picture, encoded."""
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "vlm"))


@pytest.fixture(scope="module")
def served_model(vlm: str) -> str:
    return vlm


@pytest.fixture(scope="module")
def tokenizer(alice: tinker.ServiceClient, vlm: str):
    return alice.create_lora_training_client(base_model=vlm, rank=4, seed=0).result().get_tokenizer()


def image_chunk(vlm: str, data: bytes, fmt: str = "png") -> types.ImageChunk:
    """An ImageChunk whose expected_tokens the client counts with the model's own image processor, as the
    cookbook's renderers do."""
    processor = Qwen2VLImageProcessorPil.from_pretrained(vlm)
    with Image.open(io.BytesIO(data)) as image:
        patches = processor.get_number_of_image_patches(image.height, image.width, {})
    return types.ImageChunk(data=data, format=fmt, expected_tokens=patches // processor.merge_size**2)


def prompt_with(tokenizer, chunk: types.ImageChunk) -> types.ModelInput:
    """Text, the image between Qwen's vision markers, more text."""
    before = tokenizer.encode("what is this?") + tokenizer.convert_tokens_to_ids(["<|vision_start|>"])
    after = tokenizer.convert_tokens_to_ids(["<|vision_end|>"]) + tokenizer.encode(" it is")
    return types.ModelInput(
        chunks=[types.EncodedTextChunk(tokens=before), chunk, types.EncodedTextChunk(tokens=after)]
    )


def labelled(tokenizer, chunk: types.ImageChunk, answer: str = " water") -> types.Datum:
    """The prompt and its answer as one datum trained on the answer only: its length counts the image."""
    prompt = prompt_with(tokenizer, chunk)
    answer_tokens = tokenizer.encode(answer) + [tokenizer.eos_token_id]
    model_input = prompt.append(types.EncodedTextChunk(tokens=answer_tokens[:-1]))
    tokens_before = prompt.length - 1
    targets = [0] * tokens_before + answer_tokens
    weights = [0.0] * tokens_before + [1.0] * len(answer_tokens)
    assert len(targets) == model_input.length
    return types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights})


def test_training_on_images_moves_the_loss_and_the_image_matters(alice, vlm, tokenizer) -> None:
    client = alice.create_lora_training_client(base_model=vlm, rank=4, seed=0).result()
    datum = labelled(tokenizer, image_chunk(vlm, picture(1)))
    first = client.forward_backward([datum], "cross_entropy").result()
    assert [o["logprobs"].shape for o in first.loss_fn_outputs] == [[datum.model_input.length]]
    client.optim_step(ADAM).result()
    after = client.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert after < first.metrics["loss:sum"] - 0.1, (first.metrics["loss:sum"], after)

    other = labelled(tokenizer, image_chunk(vlm, picture(2)))
    elsewhere = client.forward([other], "cross_entropy").result()
    assert abs(elsewhere.metrics["loss:sum"] - after) > 1e-4  # another picture, another loss
    # a larger image is more tokens; the logprobs cover every one of them
    big = labelled(tokenizer, image_chunk(vlm, picture(3, size=112)))
    assert big.model_input.length > datum.model_input.length
    out = client.forward([big, datum], "cross_entropy").result()
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [
        [big.model_input.length],
        [datum.model_input.length],
    ]


def test_sampling_with_an_image_returns_tokens_that_depend_on_it(alice, vlm, tokenizer) -> None:
    sampler = alice.create_sampling_client(base_model=vlm).result()
    params = types.SamplingParams(max_tokens=4, seed=0, temperature=0.0, stop=[])
    prompts = [prompt_with(tokenizer, image_chunk(vlm, picture(seed))) for seed in (1, 2)]
    results = [sampler.sample(p, 1, params, include_prompt_logprobs=True).result() for p in prompts]
    assert [len(r.sequences[0].tokens) for r in results] == [4, 4]
    assert [len(r.prompt_logprobs) for r in results] == [p.length for p in prompts]
    assert results[0].prompt_logprobs[-1] != pytest.approx(results[1].prompt_logprobs[-1], abs=1e-6)


def test_sampler_and_trainer_agree_on_logprobs_after_an_image(alice, vlm, tokenizer) -> None:
    """The sampler's prompt logprobs of text after an image equal the training forward's (same M-RoPE
    positions, same image features): what RL importance ratios rely on."""
    datum = labelled(tokenizer, image_chunk(vlm, picture(4)), answer=" the sum of water")
    trainer = alice.create_lora_training_client(base_model=vlm, rank=4, seed=0).result()  # LoRA starts at 0
    forward = trainer.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    sampler = alice.create_sampling_client(base_model=vlm).result()
    full = datum.model_input.append(types.EncodedTextChunk(tokens=[tokenizer.eos_token_id]))
    sampled = sampler.compute_logprobs(full).result()
    answer = int(sum(datum.loss_fn_inputs["weights"].tolist()))
    assert len(sampled) == full.length
    assert sampled[-answer:] == pytest.approx(forward[-answer:], abs=1e-4)


def test_bad_images_get_clear_errors(alice, vlm, tokenizer) -> None:
    client = alice.create_lora_training_client(base_model=vlm, rank=4, seed=0).result()
    good = image_chunk(vlm, picture(1))
    corrupt = types.ImageChunk(data=picture(1)[:60], format="png", expected_tokens=4)
    jpeg_said_png = types.ImageChunk(data=picture(1, fmt="JPEG"), format="png", expected_tokens=4)
    miscounted = types.ImageChunk(data=good.data, format="png", expected_tokens=good.expected_tokens + 1)
    for chunk, message in [
        (corrupt, "not a readable png image"),
        (jpeg_said_png, "are a JPEG image, not png"),
        (miscounted, f"is {good.expected_tokens} tokens for this model, not the {good.expected_tokens + 1}"),
    ]:
        with pytest.raises(tinker.RequestFailedError, match=message) as failed:
            client.forward_backward([labelled(tokenizer, chunk)], "cross_entropy").result()
        assert failed.value.category == types.RequestErrorCategory.User
    sampler = alice.create_sampling_client(base_model=vlm).result()
    params = types.SamplingParams(max_tokens=2, seed=0)
    pointer = types.ImageAssetPointerChunk(format="png", location="/etc/hosts", expected_tokens=4)
    with pytest.raises(tinker.BadRequestError, match="image_asset_pointer chunks are not supported"):
        sampler.sample(prompt_with(tokenizer, pointer), 1, params).result()
    placeholder = types.ModelInput.from_ints(tokenizer.convert_tokens_to_ids(["<|image_pad|>"]) * 3)
    with pytest.raises(tinker.BadRequestError, match="are image placeholders"):
        sampler.sample(placeholder, 1, params).result()
    # the adapter is as it was: a good datum still trains
    assert (
        client.forward_backward([labelled(tokenizer, good)], "cross_entropy").result().metrics["loss:sum"] > 0
    )


def test_chat_completions_take_data_url_images(server: Server, vlm: str) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE, max_retries=0, timeout=60)

    def ask(url: str):
        content = [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]
        return client.chat.completions.create(
            model=vlm,
            messages=[{"role": "user", "content": content}],
            max_tokens=3,
            temperature=0,
            logprobs=True,
        )

    urls = [f"data:image/png;base64,{base64.b64encode(picture(seed)).decode()}" for seed in (1, 2)]
    answers = [ask(url) for url in urls]
    assert all(a.usage.completion_tokens == 3 for a in answers)
    assert answers[0].usage.prompt_tokens > 3 + len("what is this?") // 8  # the image's tokens count
    first = [[t.logprob for t in a.choices[0].logprobs.content] for a in answers]
    assert first[0][0] != pytest.approx(first[1][0], abs=1e-6)  # the answer depends on the picture
    with pytest.raises(openai.BadRequestError, match="data URL"):
        ask("https://example.com/cat.png")
    with pytest.raises(openai.BadRequestError, match="not a readable png image"):
        ask("data:image/png;base64," + base64.b64encode(b"not an image").decode())


def test_the_vision_tower_stays_frozen(server: Server, vlm: str, alice, tokenizer) -> None:
    """LoRA trains the language model only: no adapter tensor sits in the vision tower."""
    alice.create_lora_training_client(base_model=vlm, rank=4, seed=0).result()
    base = server.engine._base(vlm)
    names = [name for group in base.targets.values() for name in group]
    assert names and not any("visual" in name for name in names)
    assert all("language_model" in name or name == "lm_head" for name in names)


def test_expected_tokens_are_what_the_server_counts(vlm: str) -> None:
    """A 56x56 picture is 4x4 patches of 14, merged 2x2: 4 tokens (the tiny processor's smallest image)."""
    assert image_chunk(vlm, picture(0)).expected_tokens == 4
    assert Path(vlm, "preprocessor_config.json").is_file()
