"""The /v1 endpoint through the official openai SDK against a real uvicorn server running the tiny model."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from nightlab.train.api.app import create_app
from nightlab.train.api.background import serve_in_thread
from nightlab.train.engine import Engine
from nightlab.train.settings import ServeSettings

KEY = "tml-openai-test"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    engine = Engine(tmp_path_factory.mktemp("engine"), device="cpu", precision="fp32", show_progress=False)
    engine.model_info(str(tiny_model_dir))  # loaded models are the ones /v1/models lists
    return engine


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, engine):
    """(base_url, model name) of a live server; its data dir is a temp dir. Requests arriving within 0.2 s of
    each other share a batch."""
    data_dir = tmp_path_factory.mktemp("serve")
    settings = ServeSettings(data_dir=data_dir, device="cpu", api_keys=[KEY], sample_batch_window_s=0.2)
    with serve_in_thread(create_app(settings, engine)) as srv:
        yield srv.url, str(tiny_model_dir.resolve())


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_the_base_model(client, server):
    ids = [m.id for m in client.models.list().data]
    assert server[1] in ids


def test_completions_with_n_logprobs_stop_and_usage(client, server):
    model = server[1]
    ref = client.completions.create(model=model, prompt="the answer is", max_tokens=12, temperature=0)
    assert ref.choices[0].finish_reason == "length"
    assert ref.usage.completion_tokens == 12 and ref.usage.prompt_tokens > 0
    assert ref.usage.total_tokens == ref.usage.prompt_tokens + 12
    text = ref.choices[0].text
    stop = text[4:7]
    cut = client.completions.create(
        model=model, prompt="the answer is", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]

    many = client.completions.create(
        model=model, prompt=["the answer is", "hi"], max_tokens=5, n=3, seed=11, logprobs=2
    )
    assert sorted(c.index for c in many.choices) == list(range(6))
    assert len({c.text for c in many.choices[:3]}) > 1  # n samples of one prompt differ
    for c in many.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 5
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    again = client.completions.create(
        model=model, prompt=["the answer is", "hi"], max_tokens=5, n=3, seed=11, logprobs=2
    )
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # seeded: reproducible


def test_chat_completion_uses_the_chat_template(client, server):
    messages = [{"role": "user", "content": "what is 2 + 3?"}]
    out = client.chat.completions.create(
        model=server[1], messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    entries = choice.logprobs.content
    assert entries and "".join(e.token for e in entries) == choice.message.content
    for e in entries:  # greedy: the chosen token is the most likely one
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
    assert out.usage.prompt_tokens > len("what is 2 + 3?") // 4  # template tokens included


def test_streaming_matches_the_non_streamed_answer(client, server):
    kwargs = dict(model=server[1], max_tokens=10, temperature=0)
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(messages=messages, **kwargs).choices[0]
    chunks = list(
        client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.finish_reason
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10

    plain = client.completions.create(prompt="the answer is", **kwargs).choices[0].text
    streamed = client.completions.create(prompt="the answer is", stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == plain


def test_budget_forcing_extension_field(client, server):
    out = client.completions.create(
        model=server[1],
        prompt="think:",
        max_tokens=12,
        temperature=0,
        extra_body={
            "budget_forcing": {"max_thinking_tokens": 3, "end_thinking": "</think>", "answer_prefix": " A:"}
        },
    )
    assert "</think> A:" in out.choices[0].text


def concurrently(server, requests: list[dict]) -> list:
    """Send completion requests at once; each answer, or the exception it raised."""

    async def send() -> list:
        aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)
        calls = (aclient.completions.create(model=server[1], **r) for r in requests)
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(send())


def test_concurrent_requests_share_one_batch(client, server, engine):
    """Concurrent greedy requests run in fewer engine calls than requests, and answer as they do alone."""
    requests = [
        {"prompt": p, "max_tokens": 6, "temperature": 0}
        for p in ["the answer is", "hi there", "what is the sum", "many numbers"]
    ]
    alone = [client.completions.create(model=server[1], **r).choices[0].text for r in requests]
    before = engine.stats()
    together = concurrently(server, requests)
    after = engine.stats()
    assert [o.choices[0].text for o in together] == alone
    assert after.sampled_requests - before.sampled_requests == 4
    assert after.sample_calls - before.sample_calls < 4  # at least two of them shared one generation


def test_a_bad_request_does_not_fail_the_requests_sent_with_it(server):
    good = {"prompt": "hi there", "max_tokens": 3, "temperature": 0}
    answers = concurrently(server, [good, {**good, "prompt": [10**6]}, good])
    assert isinstance(answers[1], openai.BadRequestError) and "token ids" in str(answers[1])
    assert answers[0].choices[0].text == answers[2].choices[0].text


def test_errors_use_openai_shape_and_status(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=server[1], prompt="x", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=server[1], prompt="x", max_tokens=10**6)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="tml-wrong", max_retries=0).models.list()
    raw = httpx.post(
        server[0] + "/v1/chat/completions",
        json={"model": server[1]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tinker://nope/sampler_weights/x", prompt="x", max_tokens=2)


def test_sampling_a_trained_checkpoint_by_tinker_path(client, server):
    """A few training steps move the adapter; /v1 on its tinker:// path answers like Tinker's own sampler."""
    import numpy as np
    import tinker
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server[1])
    prompt = tokenizer.encode("the answer is", add_special_tokens=False)
    target = tokenizer.encode(" plus plus plus plus", add_special_tokens=False)
    tokens = prompt + target
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(tokens[1:], dtype=np.int64),
            "weights": np.array([0.0] * (len(prompt) - 1) + [1.0] * len(target), dtype=np.float32),
        },
    )
    service = tinker.ServiceClient(base_url=server[0], api_key=KEY)
    training = service.create_lora_training_client(base_model=server[1], rank=4).result()
    for _ in range(4):
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(tinker.AdamParams(learning_rate=0.02)).result()
    path = training.save_weights_for_sampler(name="oai").result().path
    assert path.startswith("tinker://")

    greedy = tinker.SamplingParams(max_tokens=4, temperature=0.0)
    sampler = service.create_sampling_client(model_path=path)
    via_tinker = (
        sampler.result().sample(tinker.ModelInput.from_ints(prompt), 1, greedy).result().sequences[0].tokens
    )
    out = client.completions.create(model=path, prompt=prompt, max_tokens=4, temperature=0)
    base = client.completions.create(model=server[1], prompt=prompt, max_tokens=4, temperature=0)
    assert out.choices[0].text == tokenizer.decode(via_tinker, skip_special_tokens=True)
    assert out.choices[0].text != base.choices[0].text  # the adapter is really applied
    assert path in [m.id for m in client.models.list().data]

    chat = dict(
        messages=[{"role": "user", "content": "the answer is"}], max_tokens=6, temperature=0, logprobs=True
    )
    tuned = client.chat.completions.create(model=path, **chat).choices[0]
    plain = client.chat.completions.create(model=server[1], **chat).choices[0]
    assert tuned.logprobs.content[0].logprob != pytest.approx(plain.logprobs.content[0].logprob, abs=1e-4)
    stream = client.chat.completions.create(model=path, stream=True, **chat)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == tuned.message.content
