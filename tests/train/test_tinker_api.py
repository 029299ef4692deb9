"""The official tinker SDK against a real nightlab server (uvicorn on 127.0.0.1) serving the tiny model."""

from __future__ import annotations

import time
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
    engine: Engine
    background: BackgroundServer
    requests: list[tuple[str, str | None]]  # (path, Content-Encoding) of every request, in arrival order

    def stop(self) -> None:
        self.background.stop()


def start_server(data_dir: Path, model: str, engine: Engine | None = None, **overrides) -> Server:
    """A server for `model`, a directory outside the data dir: it serves such a model only when allowed."""
    settings = ServeSettings(
        data_dir=data_dir,
        device="cpu",
        api_keys=[ALICE, BOB],
        seq_gap_timeout_s=2.0,
        long_poll_s=5.0,
        allowed_models=[model],
        **overrides,
    )
    engine = engine or Engine(data_dir, device="cpu", precision="fp32", show_progress=False)
    app = create_app(settings, engine)
    seen: list[tuple[str, str | None]] = []

    @app.middleware("http")
    async def record(request, call_next):
        seen.append((request.url.path, request.headers.get("content-encoding")))
        return await call_next(request)

    background = serve_in_thread(app)
    return Server(background.url, data_dir, engine, background, seen)


def eventually(check, timeout: float = 20.0) -> None:
    """Wait until `check()` holds (background work such as freeing a session finishes on its own time)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


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
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        )
    return data


def train(client, data: list[types.Datum], steps: int) -> list[float]:
    """Submit forward_backward and optim_step back to back, as the SDK intends, and return the losses."""
    futures = [
        (client.forward_backward(data, "cross_entropy"), client.optim_step(ADAM)) for _ in range(steps)
    ]
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
    result = sampler.sample(
        prompt, num_samples=3, sampling_params=types.SamplingParams(max_tokens=6, seed=7)
    ).result()
    assert len(result.sequences) == 3 and len({s.sequence_id for s in result.sequences}) == 3
    for seq in result.sequences:
        assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
        assert all(lp <= 0 for lp in seq.logprobs)
    # Many concurrent requests are batched server-side and each still gets its own answers.
    futures = [
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, seed=i, stop=[])) for i in range(6)
    ]
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


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_sampler_and_trainer_agree_on_logprobs(tmp_path: Path, base, tokenizer, precision: str) -> None:
    """compute_logprobs of save_weights_and_get_sampling_client equals the trainer's forward on trained
    (non-zero) LoRA weights: both sides run one precision, bf16 autocast included; "auto" is fp32 on CPU."""
    engine = Engine(tmp_path, device="cpu", precision=precision, show_progress=False)
    srv = start_server(tmp_path, base, engine)
    try:
        service = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        client = service.create_lora_training_client(base_model=base, rank=4, seed=21).result()
        data = sft_data(tokenizer)
        train(client, data, 3)
        sampler = client.save_weights_and_get_sampling_client().result()
        for datum, text in zip(data, TEXTS, strict=True):
            scored = sampler.compute_logprobs(types.ModelInput.from_ints(tokenizer.encode(text))).result()
            trained = client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
            assert np.abs(np.array(scored[1:]) - trained.tolist()).max() < 1e-4
        service.close("success").result()
    finally:
        srv.stop()


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
    result = sampler.sample(
        types.ModelInput.from_ints(prompt), 4, types.SamplingParams(max_tokens=5, seed=1)
    ).result()
    advantages = [1.0, -1.0, 0.5, -0.5]
    data = [rl_datum(prompt, seq, a) for seq, a in zip(result.sequences, advantages, strict=True)]
    # Sampled under the same weights, the ratio is 1, so the loss is -sum(advantages) over sampled tokens.
    expected = -sum(a * len(s.tokens) for s, a in zip(result.sequences, advantages, strict=True))
    out = client.forward_backward(data, "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(expected, abs=1e-2)
    ppo = client.forward_backward(
        data, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    ).result()
    assert ppo.metrics["loss:sum"] == pytest.approx(expected, abs=1e-2)
    # With ratio 1 cispo is the policy gradient loss -sum(logp * A); dro adds beta/2 * (logp - q)^2, which the
    # prompt positions (q = 0 there) make large.
    policy_gradient = -sum(a * sum(s.logprobs) for s, a in zip(result.sequences, advantages, strict=True))
    cispo = client.forward_backward(
        data, "cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}
    ).result()
    assert cispo.metrics["loss:sum"] == pytest.approx(policy_gradient, abs=1e-2)
    dro = client.forward_backward(data, "dro", {"beta": 0.1}).result()
    expected_dro = 0.0
    for datum, output in zip(data, dro.loss_fn_outputs, strict=True):
        logp, q, adv = (
            np.array(t.tolist())
            for t in (output["logprobs"], *map(datum.loss_fn_inputs.get, ("logprobs", "advantages")))
        )
        expected_dro += float(-(logp * adv).sum() + 0.05 * ((logp - q) ** 2).sum())
    assert (
        dro.metrics["loss:sum"] == pytest.approx(expected_dro, rel=1e-4)
        and expected_dro > policy_gradient + 1
    )
    step = client.optim_step(ADAM).result().metrics
    assert step["grad_norm:mean"] > 0 and step["step:max"] == 1
    moved = client.forward(data, "importance_sampling").result().metrics["loss:sum"]
    assert moved != pytest.approx(expected, abs=1e-3)  # the step changed the policy


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
        steps.append(
            (a.forward_backward(data_a, "cross_entropy"), b.forward_backward(data_b, "cross_entropy"))
        )
        a.optim_step(ADAM), b.optim_step(ADAM)
    together_a = [fa.result().metrics["loss:sum"] for fa, _ in steps]
    together_b = [fb.result().metrics["loss:sum"] for _, fb in steps]
    np.testing.assert_allclose(together_a, solo_a, rtol=1e-5)
    np.testing.assert_allclose(together_b, solo_b, rtol=1e-5)


def test_rest_views_and_ownership(server, alice, base, tokenizer) -> None:
    client = alice.create_lora_training_client(
        base_model=base, rank=4, seed=7, user_metadata={"who": "alice"}
    ).result()
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


def wait_future(server: Server, request_id: str, key: str = ALICE) -> httpx.Response:
    while (r := post(server, "retrieve_future", key=key, json={"request_id": request_id})).status_code == 408:
        pass
    return r


def test_an_unknown_base_model_fails_at_creation_naming_the_served_models(
    server, alice, base, tokenizer
) -> None:
    """create_model is refused when it arrives (400), not accepted and failed later through its future."""
    served = str(Path(base).resolve())
    with pytest.raises(tinker.BadRequestError, match="no-such-model") as exc:
        alice.create_lora_training_client(base_model="no-such-model").result()
    assert served in str(exc.value)
    session = post(server, "create_session", json={"tags": [], "sdk_version": "x", "user_metadata": None})
    refused = post(
        server,
        "create_model",
        json={
            "session_id": session.json()["session_id"],
            "model_seq_id": 0,
            "base_model": "no-such-model",
            "lora_config": {},
        },
    )
    assert refused.status_code == 400 and refused.json()["category"] == "user"
    assert "no-such-model" in refused.json()["error"] and served in refused.json()["error"]


def test_bad_input_gets_clear_errors(server, alice, base, tokenizer) -> None:
    wrong = post(
        server,
        "create_session",
        key="tml-wrong",
        json={"tags": [], "sdk_version": "x", "user_metadata": None},
    )
    assert wrong.status_code == 401 and "unknown API key" in wrong.json()["error"]

    proto = {
        "content": b"\x0a\xff\xff\xff",
        "headers": {"X-API-Key": ALICE, "Content-Type": "application/x-protobuf"},
    }
    bad = httpx.post(f"{server.url}/api/v1/forward_backward", timeout=30, **proto)
    assert bad.status_code == 400 and "malformed protobuf" in bad.json()["error"]

    invalid = post(
        server,
        "create_model",
        json={"session_id": "s", "model_seq_id": 0, "base_model": base, "lora_config": {"rank": 0}},
    )
    assert invalid.status_code == 422 and "lora_config.rank" in invalid.json()["error"]

    # seq_id ordering, driven by hand: a retry is the same request, a gap fails after the timeout.
    session_id = post(
        server, "create_session", json={"tags": [], "sdk_version": "x", "user_metadata": None}
    ).json()
    model = post(
        server,
        "create_model",
        json={
            "session_id": session_id["session_id"],
            "model_seq_id": 0,
            "base_model": base,
            "lora_config": {"rank": 4, "seed": 0},
        },
    ).json()
    model_id = wait_future(server, model["request_id"]).json()["model_id"]
    tokens = tokenizer.encode(TEXTS[0])
    proto_headers = {"X-API-Key": ALICE, "Content-Type": "application/x-protobuf"}
    first = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        content=fwdbwd_body(model_id, 1, tokens),
        headers=proto_headers,
        timeout=30,
    ).json()
    retry = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        content=fwdbwd_body(model_id, 1, tokens),
        headers=proto_headers,
        timeout=30,
    ).json()
    assert retry["request_id"] == first["request_id"]
    changed = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        content=fwdbwd_body(model_id, 1, tokens[:-1]),
        headers=proto_headers,
        timeout=30,
    )
    assert (
        changed.status_code == 400
        and "already used by a different forward_backward" in changed.json()["error"]
    )
    done = wait_future(server, first["request_id"])
    assert done.headers["content-type"] == "application/x-protobuf"
    output = pb.ForwardBackwardOutput.FromString(done.content)
    assert output.metrics["loss:sum"] > 0 and output.loss_fn_outputs[0].num_datums == 1

    behind = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        content=fwdbwd_body(model_id, 0, tokens),
        headers=proto_headers,
        timeout=30,
    )
    assert behind.status_code == 400 and "already used by a create_model request" in behind.json()["error"]
    gap = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        content=fwdbwd_body(model_id, 5, tokens),
        headers=proto_headers,
        timeout=30,
    ).json()
    failed = wait_future(server, gap["request_id"]).json()
    assert (
        failed["category"] == "user" and "seq_id 2" in failed["error"] and "never arrived" in failed["error"]
    )
    # Only the chunks of one forward_backward may run ahead of a gap; anything else skipping a seq_id fails.
    jump = post(server, "optim_step", json={"model_id": model_id, "seq_id": 9, "adam_params": {}})
    assert jump.status_code == 400 and "arrived before seq_id 6" in jump.json()["error"]

    bob = post(server, "retrieve_future", key=BOB, json={"request_id": first["request_id"]})
    assert bob.status_code == 403
    other = post(server, "optim_step", key=BOB, json={"model_id": model_id, "seq_id": 6, "adam_params": {}})
    assert other.status_code == 403 and "another API key" in other.json()["error"]


def test_restarted_server_lists_and_loads_saved_checkpoints(tmp_path: Path, base, tokenizer) -> None:
    data = sft_data(tokenizer)
    first = start_server(tmp_path, base)
    try:
        service = tinker.ServiceClient(base_url=first.url, api_key=ALICE)
        client = service.create_lora_training_client(base_model=base, rank=4, seed=8).result()
        train(client, data, 2)
        path = client.save_state("survivor").result().path
        loss = forward_loss(client, data)
        service.close("success").result()
    finally:
        first.stop()
    second = start_server(tmp_path, base)
    try:
        service = tinker.ServiceClient(base_url=second.url, api_key=ALICE)
        run_id = types.ParsedCheckpointTinkerPath.from_tinker_path(path).training_run_id
        listed = (
            tinker.RestClient(base_url=second.url, api_key=ALICE)
            .list_checkpoints(run_id)
            .result()
            .checkpoints
        )
        assert [c.tinker_path for c in listed] == [path]
        resumed = service.create_training_client_from_state_with_optimizer(path).result()
        assert forward_loss(resumed, data) == pytest.approx(loss, rel=1e-5)
        gone = post(
            second, "get_info", json={"model_id": run_id}
        )  # models live in memory: the old id is gone
        assert gone.status_code == 404 and "create_training_client_from_state" in gone.json()["error"]
        service.close("success").result()
    finally:
        second.stop()


def test_budget_forcing_extension_through_asample(server, base, tokenizer) -> None:
    """The sample request's nightlab extension field forces the thinking delimiter and answer prefix."""
    body = {
        "base_model": base,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokenizer.encode("what is 2 + 3?")}]},
        "sampling_params": {"max_tokens": 24, "temperature": 0.0},
        "budget_forcing": {
            "max_thinking_tokens": 4,
            "end_thinking": "</think>",
            "answer_prefix": " The answer is",
        },
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


def test_a_bad_sample_request_fails_alone(server, alice, base, tokenizer) -> None:
    """A request the model can never serve is refused before it joins a batch; those sent with it succeed."""
    sampler = alice.create_sampling_client(base_model=base).result()
    good = types.ModelInput.from_ints(tokenizer.encode("the sum of"))
    bad = types.ModelInput.from_ints([10**6])
    params = types.SamplingParams(max_tokens=3, seed=0, stop=[])
    futures = [sampler.sample(prompt, 1, params) for prompt in (good, bad, good, good)]
    with pytest.raises(tinker.BadRequestError, match="outside the vocabulary"):
        futures[1].result()
    assert [len(f.result().sequences[0].tokens) for f in futures[::2] + futures[3:]] == [3, 3, 3]
    too_long = {
        "base_model": base,
        "prompt": {"chunks": [{"tokens": good.to_ints()}]},
        "sampling_params": {"max_tokens": 10**6},
    }
    refused = post(server, "asample", json=too_long)
    assert refused.status_code == 400 and "context length" in refused.json()["error"]


def test_finishing_a_session_frees_its_memory_and_keeps_its_checkpoints(server, base, tokenizer) -> None:
    engine, data = server.engine, sft_data(tokenizer)
    before = engine.stats()
    service = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    client = service.create_lora_training_client(base_model=base, rank=4, seed=9).result()
    train(client, data, 1)
    state = client.save_state("kept").result().path
    named = client.save_weights_for_sampler("kept-sampler").result().path
    loss = forward_loss(client, data)
    prompt = types.ModelInput.from_ints(tokenizer.encode("the sum of"))
    client.save_weights_and_get_sampling_client().result().sample(
        prompt, 1, types.SamplingParams(max_tokens=2)
    ).result()
    live = engine.stats()
    ephemeral = server.data_dir / "ephemeral" / client.model_id.replace(":", "_")
    assert live.training_adapters == before.training_adapters + 1 and ephemeral.is_dir()

    service.close("success").result()
    eventually(
        lambda: engine.stats().training_adapters == before.training_adapters and not ephemeral.exists()
    )
    assert engine.stats().sampler_adapters == live.sampler_adapters - 1
    gone = post(server, "get_info", json={"model_id": client.model_id})
    assert gone.status_code == 404

    again = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    resumed = again.create_training_client_from_state_with_optimizer(state).result()
    assert forward_loss(resumed, data) == pytest.approx(loss, rel=1e-5)
    sampled = (
        again.create_sampling_client(model_path=named)
        .result()
        .sample(prompt, 1, types.SamplingParams(max_tokens=2))
    )
    assert len(sampled.result().sequences) == 1
    again.close("success").result()


def test_a_session_without_heartbeats_is_ended_and_freed(tmp_path: Path, base) -> None:
    srv = start_server(tmp_path, base, session_timeout_s=0.5)
    try:
        srv.engine.model_info(base)  # loaded up front, so creating the model takes well under the timeout
        session = post(
            srv, "create_session", json={"tags": [], "sdk_version": "x", "user_metadata": None}
        ).json()
        created = post(
            srv,
            "create_model",
            json={
                "session_id": session["session_id"],
                "model_seq_id": 0,
                "base_model": base,
                "lora_config": {"rank": 4},
            },
        ).json()
        assert "model_id" in wait_future(srv, created["request_id"]).json()
        eventually(lambda: srv.engine.stats().training_adapters == 0)
        beat = post(srv, "session_heartbeat", json={"session_id": session["session_id"]})
        assert beat.status_code == 410
    finally:
        srv.stop()


class SlowSaveEngine(Engine):
    """Every save takes a second, so a shutdown starts while one runs and another waits its turn."""

    def save_adapter(self, *args, **kwargs) -> None:
        time.sleep(1.0)
        super().save_adapter(*args, **kwargs)


def test_shutdown_lets_queued_saves_finish(tmp_path: Path, base) -> None:
    srv = start_server(
        tmp_path, base, SlowSaveEngine(tmp_path, device="cpu", precision="fp32", show_progress=False)
    )
    try:
        session = post(
            srv, "create_session", json={"tags": [], "sdk_version": "x", "user_metadata": None}
        ).json()
        created = post(
            srv,
            "create_model",
            json={
                "session_id": session["session_id"],
                "model_seq_id": 0,
                "base_model": base,
                "lora_config": {"rank": 4},
            },
        ).json()
        model_id = wait_future(srv, created["request_id"]).json()["model_id"]
        for seq in (1, 2):
            assert post(
                srv, "save_weights", json={"model_id": model_id, "seq_id": seq, "path": f"at-exit-{seq}"}
            ).is_success
    finally:
        srv.stop()
    again = start_server(tmp_path, base)
    try:
        listed = (
            tinker.RestClient(base_url=again.url, api_key=ALICE)
            .list_checkpoints(model_id)
            .result()
            .checkpoints
        )
        assert sorted(c.checkpoint_id for c in listed) == ["weights/at-exit-1", "weights/at-exit-2"]
    finally:
        again.stop()


def test_inflight_samplers_follow_later_saves(alice, base, tokenizer) -> None:
    client = alice.create_lora_training_client(base_model=base, rank=4, seed=13).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(TEXTS[0]))

    def scored(sampler) -> np.ndarray:
        return np.array(sampler.compute_logprobs(prompt).result()[1:])

    snapshot = client.save_weights_and_get_sampling_client().result()
    early = client.save_weights_and_get_sampling_client(kind="inflight").result()
    before = scored(early)
    train(client, sft_data(tokenizer), 2)
    late = client.save_weights_and_get_sampling_client(kind="inflight").result()
    np.testing.assert_allclose(scored(early), scored(late), atol=1e-5)  # one shared target for both
    assert not np.allclose(scored(early), before, atol=1e-3)  # so the early sampler sees the later weights
    np.testing.assert_allclose(scored(snapshot), before, atol=1e-5)  # while a snapshot stays put


def test_load_weights_accepts_an_alias_of_the_base_model(alice, base, tokenizer, tmp_path: Path) -> None:
    client = alice.create_lora_training_client(base_model=base, rank=4, seed=14).result()
    path = client.save_state("aliased").result().path
    alias = tmp_path / "same-model"
    alias.symlink_to(base)
    resumed = alice.create_training_client_from_state(path, base_model=str(alias)).result()
    data = sft_data(tokenizer)
    assert forward_loss(resumed, data) == pytest.approx(forward_loss(client, data), rel=1e-5)


def test_provenance_is_ignored_by_losses_that_do_not_use_it(alice, base, tokenizer) -> None:
    """Only stable_reinforce reads provenance (tests/train/test_stability.py); to the others it is inert."""
    client = alice.create_lora_training_client(base_model=base, rank=4, seed=16).result()
    datum = sft_data(tokenizer)[0]
    span = [types.PromptProvenanceSpan(sequence_id="req-x:0", length=datum.model_input.length)]
    marked = datum.with_provenance(model_input=span, loss_fn_inputs=span)
    out = client.forward(data=[marked], loss_fn="cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(forward_loss(client, [datum]), rel=1e-6)


def test_unsupported_endpoints_answer_a_clear_404(server) -> None:
    answer = post(server, "publish_checkpoint", json={})
    assert answer.status_code == 404 and "not supported by nightlab serve" in answer.json()["error"]


def test_chunked_and_compressed_forward_backward_matches_one_request(server, base, tokenizer) -> None:
    """5 datums in chunks of 2, zstd-compressed and in parallel, give the unchunked loss, logprobs, grads."""
    chunked = start_server(
        server.data_dir / "chunked", base, server.engine, fwdbwd_max_chunk_len=2, proto_compress_fwdbwd=True
    )
    data = sft_data(tokenizer, TEXTS + TEXTS[:2])
    outcomes = []
    try:
        for srv in (server, chunked):
            service = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
            client = service.create_lora_training_client(base_model=base, rank=4, seed=15).result()
            out = client.forward_backward(data, "cross_entropy").result()
            grad_norm = client.optim_step(ADAM).result().metrics["grad_norm:mean"]
            outcomes.append((out, grad_norm, forward_loss(client, data)))
            service.close("success").result()
        sent = [encoding for path, encoding in chunked.requests if path.endswith("/forward_backward")]
    finally:
        chunked.stop()
    (whole, whole_norm, whole_after), (parts, parts_norm, parts_after) = outcomes
    assert sent == ["zstd"] * 6  # forward_backward and forward, 3 chunks each
    assert parts.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    for a, b in zip(whole.loss_fn_outputs, parts.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"].tolist(), b["logprobs"].tolist(), atol=1e-5)
    assert parts_norm == pytest.approx(whole_norm, rel=1e-4) and parts_after == pytest.approx(
        whole_after, rel=1e-5
    )


def test_topk_prompt_logprobs_and_stop_strings_through_the_sdk(alice, base, tokenizer) -> None:
    sampler = alice.create_sampling_client(base_model=base).result()
    tokens = tokenizer.encode(TEXTS[0])
    prompt = types.ModelInput.from_ints(tokens)
    greedy = types.SamplingParams(max_tokens=12, temperature=0.0)
    out = sampler.sample(prompt, 1, greedy, include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    assert out.prompt_logprobs[0] is None and out.topk_prompt_logprobs[0] is None
    for token, logprob, top in zip(
        tokens[1:], out.prompt_logprobs[1:], out.topk_prompt_logprobs[1:], strict=True
    ):
        values = [v for _, v in top]
        assert len(top) == 3 and values == sorted(values, reverse=True) and logprob <= values[0] + 1e-5
        if token in dict(top):
            assert dict(top)[token] == pytest.approx(logprob, abs=1e-4)

    text = tokenizer.decode(out.sequences[0].tokens)
    stop = text[len(text) // 3 :][:3]
    cut = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])
    ).result()
    seq = cut.sequences[0]
    cut_text = tokenizer.decode(seq.tokens)
    assert (
        seq.stop_reason == "stop" and stop in cut_text and text.startswith(cut_text)
    )  # the stop text included
    assert len(seq.tokens) < len(out.sequences[0].tokens)
