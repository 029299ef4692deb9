"""The official tinker SDK against a real nightlab server (uvicorn on 127.0.0.1) serving the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from nightlab.train.api.app import create_app
from nightlab.train.api.background import BackgroundServer, serve_in_thread
from nightlab.train.engine import Engine
from nightlab.train.settings import ServeSettings

ALICE, BOB = "tml-alice-key", "tml-bob-key"
ADAM = types.AdamParams(learning_rate=2e-2)
TEXTS = ["the sum of 12 and 30 is 42.", "what time is it? answer: now.", "water is very long and little."]


@dataclass
class Server:
    url: str
    data_dir: Path
    background: BackgroundServer

    def stop(self) -> None:
        self.background.stop()


def start_server(data_dir: Path, engine: Engine | None = None, **overrides) -> Server:
    settings = ServeSettings(
        data_dir=data_dir, device="cpu", api_keys=[ALICE, BOB], seq_gap_timeout_s=2.0, long_poll_s=5.0, **overrides
    )
    app = create_app(settings, engine or Engine(data_dir, device="cpu", precision="fp32", show_progress=False))
    background = serve_in_thread(app)
    return Server(background.url, data_dir, background)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("serve"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(server: Server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(alice: tinker.ServiceClient, base: str):
    """From get_tokenizer(): the tokenizer_id the server reports must load offline on the client."""
    return alice.create_lora_training_client(base_model=base, rank=4, seed=0).result().get_tokenizer()


def sft_data(tokenizer, texts: list[str] = TEXTS) -> list[types.Datum]:
    data = []
    for text in texts:
        tokens = tokenizer.encode(text)
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        ))
    return data


def train(client, data: list[types.Datum], steps: int) -> list[float]:
    """Submit forward_backward and optim_step back to back, as the SDK intends, and return the losses."""
    futures = [(client.forward_backward(data, "cross_entropy"), client.optim_step(ADAM)) for _ in range(steps)]
    return [fb.result().metrics["loss:sum"] for fb, opt in futures if opt.result() is not None]


def forward_loss(client, data: list[types.Datum]) -> float:
    return client.forward(data, "cross_entropy").result().metrics["loss:sum"]


def test_sft_loss_falls_and_outputs_fit_the_data(alice, base, tokenizer) -> None:
    client = alice.create_lora_training_client(base_model=base, rank=8, seed=1).result()
    info = client.get_info()
    assert info.model_data.model_name == base and info.lora_rank == 8
    data = sft_data(tokenizer)
    out = client.forward_backward(data, "cross_entropy").result()
    assert {"loss:sum", "num_tokens:sum"} <= set(out.metrics)
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[d.model_input.length] for d in data]
    client.optim_step(ADAM).result()
    losses = train(client, data, 6)
    assert losses[-1] < 0.8 * losses[0], losses


def test_save_state_then_resume_with_optimizer_continues_identically(alice, base, tokenizer) -> None:
    data = sft_data(tokenizer)
    original = alice.create_lora_training_client(base_model=base, rank=4, seed=2).result()
    train(original, data, 2)
    path = original.save_state("resume-me").result().path
    assert path.startswith("tinker://") and path.endswith("/weights/resume-me")
    resumed = alice.create_training_client_from_state_with_optimizer(path).result()
    assert forward_loss(resumed, data) == pytest.approx(forward_loss(original, data), rel=1e-5)
    # One more Adam step on each: equal only if the optimizer moments came back too.
    after = [train(c, data, 1) and forward_loss(c, data) for c in (original, resumed)]
    assert after[1] == pytest.approx(after[0], rel=1e-4)
    weights_only = alice.create_training_client_from_state(path).result()
    train(weights_only, data, 1)
    assert forward_loss(weights_only, data) != pytest.approx(after[0], rel=1e-4)


def test_sample_from_saved_sampler_weights(alice, base, tokenizer) -> None:
    client = alice.create_lora_training_client(base_model=base, rank=4, seed=3).result()
    train(client, sft_data(tokenizer), 2)
    path = client.save_weights_for_sampler("for-sampling").result().path
    assert "/sampler_weights/for-sampling" in path
    sampler = alice.create_sampling_client(model_path=path).result()
    assert sampler.get_base_model() == base
    prompt = types.ModelInput.from_ints(tokenizer.encode("the sum of"))
    result = sampler.sample(prompt, num_samples=3, sampling_params=types.SamplingParams(max_tokens=6, seed=7)).result()
    assert len(result.sequences) == 3 and len({s.sequence_id for s in result.sequences}) == 3
    for seq in result.sequences:
        assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
        assert all(lp <= 0 for lp in seq.logprobs)
    # Many concurrent requests are batched server-side and each still gets its own answers.
    futures = [sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, seed=i, stop=[])) for i in range(6)]
    assert all(len(f.result().sequences[0].tokens) == 4 for f in futures)  # stop=[]: run to max_tokens


def test_compute_logprobs_matches_the_training_forward(alice, base, tokenizer) -> None:
    client = alice.create_lora_training_client(base_model=base, rank=4, seed=4).result()
    data = sft_data(tokenizer)
    train(client, data, 1)
    sampler = client.save_weights_and_get_sampling_client().result()
    tokens = tokenizer.encode(TEXTS[0])
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    trained = client.forward(data[:1], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert scored[0] is None and len(scored) == len(tokens)
    np.testing.assert_allclose(scored[1:], trained, rtol=1e-3, atol=1e-3)


def rl_datum(prompt: list[int], seq, advantage: float) -> types.Datum:
    pad = [0.0] * (len(prompt) - 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(prompt + seq.tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": prompt[1:] + seq.tokens,
            "logprobs": pad + list(seq.logprobs),
            "advantages": pad + [advantage] * len(seq.tokens),
        },
    )


def test_rl_step_with_importance_sampling_and_ppo(alice, base, tokenizer) -> None:
    client = alice.create_lora_training_client(base_model=base, rank=4, seed=5).result()
    sampler = client.save_weights_and_get_sampling_client().result()
    prompt = tokenizer.encode("what time is it?")
    result = sampler.sample(types.ModelInput.from_ints(prompt), 4, types.SamplingParams(max_tokens=5, seed=1)).result()
    advantages = [1.0, -1.0, 0.5, -0.5]
    data = [rl_datum(prompt, seq, a) for seq, a in zip(result.sequences, advantages, strict=True)]
    # Sampled under the same weights, the ratio is 1, so the loss is -sum(advantages) over sampled tokens.
    expected = -sum(a * len(s.tokens) for s, a in zip(result.sequences, advantages, strict=True))
    out = client.forward_backward(data, "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(expected, abs=1e-2)
    ppo = client.forward_backward(data, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}).result()
    assert ppo.metrics["loss:sum"] == pytest.approx(expected, abs=1e-2)
    assert client.optim_step(ADAM).result().metrics


def test_forward_backward_custom_agrees_with_cross_entropy(alice, base, tokenizer) -> None:
    client = alice.create_lora_training_client(base_model=base, rank=4, seed=6).result()
    data = sft_data(tokenizer)
    expected = forward_loss(client, data)

    def neg_log_likelihood(batch, logprobs):
        loss = sum(-lp.sum() for lp in logprobs)
        return loss, {"custom:mean": 1.0}

    out = client.forward_backward_custom(data, neg_log_likelihood).result()
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    assert out.metrics["custom:mean"] == 1.0
    client.optim_step(ADAM).result()
    assert forward_loss(client, data) < expected


def test_two_clients_on_one_base_reproduce_their_solo_runs(alice, base, tokenizer) -> None:
    data_a, data_b = sft_data(tokenizer, TEXTS[:2]), sft_data(tokenizer, TEXTS[1:])

    def new(seed: int):
        return alice.create_lora_training_client(base_model=base, rank=4, seed=seed).result()

    solo_a, solo_b = train(new(11), data_a, 3), train(new(12), data_b, 3)
    a, b = new(11), new(12)
    steps = []
    for _ in range(3):  # interleaved: both queues busy on the same base model at once
        steps.append((a.forward_backward(data_a, "cross_entropy"), b.forward_backward(data_b, "cross_entropy")))
        a.optim_step(ADAM), b.optim_step(ADAM)
    together_a = [fa.result().metrics["loss:sum"] for fa, _ in steps]
    together_b = [fb.result().metrics["loss:sum"] for _, fb in steps]
    np.testing.assert_allclose(together_a, solo_a, rtol=1e-5)
    np.testing.assert_allclose(together_b, solo_b, rtol=1e-5)


def test_rest_views_and_ownership(server, alice, base, tokenizer) -> None:
    client = alice.create_lora_training_client(base_model=base, rank=4, seed=7, user_metadata={"who": "alice"}).result()
    path = client.save_state("listed").result().path
    run_id = client.model_id
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    run = rest.get_training_run(run_id).result()
    assert run.base_model == base and run.lora_rank == 4 and run.last_checkpoint.tinker_path == path
    assert [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints] == [path]
    assert run_id in [r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs]
    info = rest.get_weights_info_by_tinker_path(path).result()
    assert info.base_model == base and info.lora_rank == 4
    caps = rest.get_server_capabilities().result()
    assert base in [m.model_name for m in caps.supported_models]

    bob = tinker.RestClient(base_url=server.url, api_key=BOB)
    with pytest.raises(tinker.PermissionDeniedError, match="belongs to another API key"):
        bob.get_training_run(run_id).result()
    with pytest.raises(tinker.PermissionDeniedError, match="belongs to another API key"):
        bob.get_weights_info_by_tinker_path(path).result()
    assert run_id not in [r.training_run_id for r in bob.list_training_runs().result().training_runs]

    rest.delete_checkpoint_from_tinker_path(path).result()
    assert rest.list_checkpoints(run_id).result().checkpoints == []


def post(server: Server, route: str, key: str = ALICE, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/api/v1/{route}", headers={"X-API-Key": key}, timeout=30, **kwargs)


def fwdbwd_body(model_id: str, seq_id: int, tokens: list[int]) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray(tokens[:-1], np.int32).tobytes()
    target = datum.loss_fn_inputs["target_tokens"]
    target.dtype, target.dense = pb.DTYPE_INT64, np.asarray(tokens[1:], np.int64).tobytes()
    target.shape.append(len(tokens) - 1)
    return msg.SerializeToString()


def wait_future(server: Server, request_id: str) -> httpx.Response:
    while (r := post(server, "retrieve_future", json={"request_id": request_id})).status_code == 408:
        pass
    return r


def test_bad_input_gets_clear_errors(server, alice, base, tokenizer) -> None:
    with pytest.raises(tinker.RequestFailedError, match="no-such-model") as exc:
        alice.create_lora_training_client(base_model="no-such-model").result()
    assert exc.value.category == types.RequestErrorCategory.User

    wrong = post(server, "create_session", key="tml-wrong", json={"tags": [], "sdk_version": "x", "user_metadata": None})
    assert wrong.status_code == 401 and "unknown API key" in wrong.json()["error"]

    proto = {"content": b"\x0a\xff\xff\xff", "headers": {"X-API-Key": ALICE, "Content-Type": "application/x-protobuf"}}
    bad = httpx.post(f"{server.url}/api/v1/forward_backward", timeout=30, **proto)
    assert bad.status_code == 400 and "malformed protobuf" in bad.json()["error"]

    invalid = post(server, "create_model", json={"session_id": "s", "model_seq_id": 0, "base_model": base,
                                                 "lora_config": {"rank": 0}})
    assert invalid.status_code == 422 and "lora_config.rank" in invalid.json()["error"]

    # seq_id ordering, driven by hand: a retry is the same request, a gap fails after the timeout.
    session_id = post(server, "create_session", json={"tags": [], "sdk_version": "x", "user_metadata": None}).json()
    model = post(server, "create_model", json={"session_id": session_id["session_id"], "model_seq_id": 0,
                                               "base_model": base, "lora_config": {"rank": 4, "seed": 0}}).json()
    model_id = wait_future(server, model["request_id"]).json()["model_id"]
    tokens = tokenizer.encode(TEXTS[0])
    proto_headers = {"X-API-Key": ALICE, "Content-Type": "application/x-protobuf"}
    first = httpx.post(f"{server.url}/api/v1/forward_backward", content=fwdbwd_body(model_id, 1, tokens),
                       headers=proto_headers, timeout=30).json()
    retry = httpx.post(f"{server.url}/api/v1/forward_backward", content=fwdbwd_body(model_id, 1, tokens),
                       headers=proto_headers, timeout=30).json()
    assert retry["request_id"] == first["request_id"]
    done = wait_future(server, first["request_id"])
    assert done.headers["content-type"] == "application/x-protobuf"
    output = pb.ForwardBackwardOutput.FromString(done.content)
    assert output.metrics["loss:sum"] > 0 and output.loss_fn_outputs[0].num_datums == 1

    behind = httpx.post(f"{server.url}/api/v1/forward_backward", content=fwdbwd_body(model_id, 0, tokens),
                        headers=proto_headers, timeout=30)
    assert behind.status_code == 400 and "already used by a create_model request" in behind.json()["error"]
    gap = httpx.post(f"{server.url}/api/v1/forward_backward", content=fwdbwd_body(model_id, 5, tokens),
                     headers=proto_headers, timeout=30).json()
    failed = wait_future(server, gap["request_id"]).json()
    assert failed["category"] == "user" and "seq_id 2" in failed["error"] and "never arrived" in failed["error"]

    bob = post(server, "retrieve_future", key=BOB, json={"request_id": first["request_id"]})
    assert bob.status_code == 403
    other = post(server, "optim_step", key=BOB, json={"model_id": model_id, "seq_id": 6, "adam_params": {}})
    assert other.status_code == 403 and "another API key" in other.json()["error"]


def test_restarted_server_lists_and_loads_saved_checkpoints(tmp_path: Path, base, tokenizer) -> None:
    data = sft_data(tokenizer)
    first = start_server(tmp_path)
    try:
        service = tinker.ServiceClient(base_url=first.url, api_key=ALICE)
        client = service.create_lora_training_client(base_model=base, rank=4, seed=8).result()
        train(client, data, 2)
        path = client.save_state("survivor").result().path
        loss = forward_loss(client, data)
        service.close("success").result()
    finally:
        first.stop()
    second = start_server(tmp_path)
    try:
        service = tinker.ServiceClient(base_url=second.url, api_key=ALICE)
        run_id = types.ParsedCheckpointTinkerPath.from_tinker_path(path).training_run_id
        listed = tinker.RestClient(base_url=second.url, api_key=ALICE).list_checkpoints(run_id).result().checkpoints
        assert [c.tinker_path for c in listed] == [path]
        resumed = service.create_training_client_from_state_with_optimizer(path).result()
        assert forward_loss(resumed, data) == pytest.approx(loss, rel=1e-5)
        gone = post(second, "get_info", json={"model_id": run_id})  # models live in memory: the old id is gone
        assert gone.status_code == 404 and "create_training_client_from_state" in gone.json()["error"]
        service.close("success").result()
    finally:
        second.stop()


def test_budget_forcing_extension_through_asample(server, base, tokenizer) -> None:
    """The sample request's nightlab extension field forces the thinking delimiter and answer prefix."""
    body = {
        "base_model": base, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokenizer.encode("what is 2 + 3?")}]},
        "sampling_params": {"max_tokens": 24, "temperature": 0.0},
        "budget_forcing": {"max_thinking_tokens": 4, "end_thinking": "</think>", "answer_prefix": " The answer is"},
    }
    accepted = post(server, "asample", json=body)
    assert accepted.status_code == 200, accepted.text
    done = wait_future(server, accepted.json()["request_id"])
    seq = pb.SampleResponse.FromString(done.content).sequences[0]
    text = tokenizer.decode(np.frombuffer(seq.tokens, np.int32).tolist())
    assert "</think> The answer is" in text
    thinking = tokenizer.encode(text.split("</think>")[0])
    assert len(thinking) <= 4 + 1  # the budget, give or take a token merged across the boundary
    bad = post(server, "asample", json={**body, "budget_forcing": {"max_thinking_tokens": 0}})
    assert bad.status_code == 422 and "max_thinking_tokens" in bad.text
