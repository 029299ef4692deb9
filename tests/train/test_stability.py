"""StableReinforce end to end with the official SDK: sampling with record_stability_info, sequence ids, the
datums' provenance checked against what the sampler recorded, and the loss on the recorded numbers; then the
record store's own rules (a day after last use, one session, least recently used first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker import types
from transformers import AutoModelForCausalLM, AutoTokenizer

from nightlab.train.errors import UserError
from nightlab.train.records import Datum
from nightlab.train.sampling import SampledSequence, SampleRequest, SamplingParams, generate
from nightlab.train.stability import Provenance, Span, StabilityStore
from tests.train.test_tinker_api import ALICE

TEMPERATURE, TOP_K = 0.7, 5


@pytest.fixture(scope="module")
def trainer(alice: tinker.ServiceClient, tiny_model_dir: Path) -> tinker.TrainingClient:
    return alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0).result()


@pytest.fixture(scope="module")
def sampled(trainer: tinker.TrainingClient) -> tuple[list[int], types.SampleResponse]:
    """Two samples at temperature 0.7 within the top 5, recorded, with the top 5 raw logprobs of each step."""
    sampler = trainer.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = [5, 17, 42, 8, 99, 3]
    params = types.SamplingParams(max_tokens=6, seed=11, temperature=TEMPERATURE, top_k=TOP_K, stop=[])
    response = sampler.sample(
        types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params, topk_sample_logprobs=TOP_K
    ).result()
    return prompt, response


def datum(
    prompt: list[int],
    tokens: list[int],
    sequence_id: str,
    advantage: float,
    prompt_advantage: float = 0.0,
) -> types.Datum:
    """One trajectory as the cookbook builds it: prompt + sampled tokens shifted by one, the advantage on the
    sampled tokens, and spans naming the sequence behind each position."""
    full = prompt + tokens
    d = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": full[1:],
            "logprobs": [0.0] * (len(full) - 1),  # the server uses what it recorded instead
            "advantages": [prompt_advantage] * (len(prompt) - 1) + [advantage] * len(tokens),
        },
    )
    return d.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, length=len(prompt)),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=len(tokens) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, offset=1, length=len(prompt) - 1),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=len(tokens)),
        ],
    )


def drawn_logprob(seq: types.SampledSequence, step: int) -> float:
    """log mu: the token's probability at temperature 0.7 among the top 5, from the top-5 raw logprobs."""
    top = seq.topk_logprobs[step]
    scaled = np.array([lp for _, lp in top]) / TEMPERATURE
    mine = next(lp for tok, lp in top if tok == seq.tokens[step]) / TEMPERATURE
    return float(mine - np.logaddexp.reduce(scaled))


def test_recorded_samples_carry_distinct_sequence_ids(sampled) -> None:
    _, response = sampled
    ids = [seq.sequence_id for seq in response.sequences]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(ids)
    assert all(len(seq.tokens) == 6 for seq in response.sequences)


def test_stable_reinforce_weighs_each_token_by_how_it_was_drawn(trainer, sampled) -> None:
    """The loss is the sum over sampled tokens of -min(pi/mu, 2) * A * logp (kl_coeff 0), where mu is the
    probability the sampler drew the token with: here at temperature 0.7 within the top 5, which the
    response's logprobs (temperature 1) do not say and the server recorded."""
    prompt, response = sampled
    advantages = [1.0, -0.5]
    data = [
        datum(prompt, seq.tokens, seq.sequence_id, a)
        for seq, a in zip(response.sequences, advantages, strict=True)
    ]
    out = trainer.forward(data, "stable_reinforce").result()
    expected = naive = 0.0
    for seq, a, output in zip(response.sequences, advantages, out.loss_fn_outputs, strict=True):
        logp = output["logprobs"].tolist()[len(prompt) - 1 :]
        np.testing.assert_allclose(logp, seq.logprobs, atol=1e-4)  # same weights, same numerics
        for step, lp in enumerate(logp):
            expected += -min(np.exp(lp - drawn_logprob(seq, step)), 2.0) * a * lp
            naive += -a * lp  # weighing against the response's own logprobs: a weight of ~1
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    assert out.metrics["loss:sum"] != pytest.approx(naive, rel=1e-2)


def test_datums_that_do_not_match_the_records_are_refused(server, trainer, sampled) -> None:
    prompt, response = sampled
    seq = response.sequences[0]
    unrecorded = (
        trainer.save_weights_and_get_sampling_client()
        .result()
        .sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=3, seed=0, stop=[]))
        .result()
        .sequences[0]
    )
    other = tinker.ServiceClient(base_url=server.url, api_key=ALICE)  # another session, same key
    try:
        base = trainer.get_info().model_data.model_name
        stranger = other.create_lora_training_client(base_model=base, rank=4).result()
        with pytest.raises(tinker.BadRequestError, match="sampled in another session"):
            stranger.forward([datum(prompt, seq.tokens, seq.sequence_id, 1.0)], "stable_reinforce").result()
    finally:
        other.close("success").result()
    plain = types.Datum(
        model_input=types.ModelInput.from_ints(prompt[:-1]),
        loss_fn_inputs={"target_tokens": prompt[1:], "logprobs": [0.0] * 5, "advantages": [0.0] * 5},
    )
    tampered = [(seq.tokens[0] + 1) % 50, *seq.tokens[1:]]
    cases = [
        (plain, "datum 0 has no provenance"),
        (datum(prompt, tampered, seq.sequence_id, 1.0), "differ from"),
        (datum(prompt, seq.tokens, "nope:0", 1.0), "no recorded sequence 'nope:0'"),
        (datum(prompt, unrecorded.tokens, unrecorded.sequence_id, 1.0), "no recorded sequence"),
        (datum(prompt, seq.tokens, seq.sequence_id, 1.0, prompt_advantage=1.0), "nonzero advantages"),
        (datum(prompt, [*seq.tokens, seq.tokens[-1]], seq.sequence_id, 1.0), "runs past"),
    ]
    for bad, message in cases:
        with pytest.raises(tinker.BadRequestError, match=message):
            trainer.forward([bad], "stable_reinforce").result()


def test_the_sampler_reports_how_each_token_was_drawn(tiny_model_dir: Path) -> None:
    """sampling_logprobs: 0 when greedy, the raw logprob at temperature 1, and otherwise the log-probability
    under the tempered, top-p-truncated, renormalized distribution, as a full forward computes it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = [5, 17, 42, 8]
    params = [
        SamplingParams(max_tokens=5, temperature=0.0, stop_at_eos=False),
        SamplingParams(max_tokens=5, seed=1, stop_at_eos=False),
        SamplingParams(max_tokens=5, seed=2, temperature=0.5, top_p=0.9, stop_at_eos=False),
    ]
    greedy, plain, shaped = (
        r.sequences[0] for r in generate(model, tokenizer, [SampleRequest(prompt, p) for p in params])
    )
    assert greedy.sampling_logprobs == [0.0] * 5
    np.testing.assert_allclose(plain.sampling_logprobs, plain.logprobs, atol=1e-5)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + shaped.tokens])).logits[0, len(prompt) - 1 : -1].double()
    for step, token in enumerate(shaped.tokens):
        probs, order = torch.softmax(logits[step] / 0.5, -1).sort(descending=True)
        kept = probs * ((probs.cumsum(-1) - probs) < 0.9)
        expected = (kept[order == token] / kept.sum()).log().item()
        assert shaped.sampling_logprobs[step] == pytest.approx(expected, abs=1e-4)
    assert shaped.sampling_logprobs != pytest.approx(shaped.logprobs, abs=1e-2)


# -- the record store ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recorded(store: StabilityStore, session: str, sequence_id: str, tokens: list[int]) -> None:
    seq = SampledSequence(tokens, [-1.0] * len(tokens), "length", sampling_logprobs=[-0.5] * len(tokens))
    store.record(session, [1, 2], [(sequence_id, seq)])


def use(store: StabilityStore, session: str, sequence_id: str) -> Datum:
    spans = [Span(False, sequence_id, 0, 2), Span(True, sequence_id, 0, 1)]
    data = [Datum([1, 2, 7], {"target_tokens": np.array([2, 7, 7]), "advantages": np.zeros(3, np.float32)})]
    targets = [Span(False, sequence_id, 1, 1), Span(True, sequence_id, 0, 2)]
    return store.resolve(session, data, [Provenance(spans, targets)])[0]


def test_the_store_fills_the_recorded_numbers() -> None:
    store = StabilityStore()
    recorded(store, "s", "a:0", [7, 7])
    filled = use(store, "s", "a:0").loss_fn_inputs
    assert filled["logprobs"].tolist() == [0.0, -1.0, -1.0]
    assert filled["sampling_logprobs"].tolist() == [0.0, -0.5, -0.5]
    assert filled["sampled_mask"].tolist() == [0.0, 1.0, 1.0]


def test_a_record_lives_a_day_after_its_last_use_in_its_session_only() -> None:
    clock = Clock()
    store = StabilityStore(clock=clock)
    recorded(store, "s", "a:0", [7, 7])
    clock.now = 20 * 3600.0
    use(store, "s", "a:0")  # restarts its day
    clock.now = 40 * 3600.0
    assert store.expire() == 0
    with pytest.raises(UserError, match="sampled in another session"):
        use(store, "t", "a:0")
    clock.now = 44.1 * 3600.0
    assert store.expire() == 1 and len(store) == 0
    recorded(store, "s", "b:0", [7, 7])
    store.drop_session("s")
    assert len(store) == 0


def test_past_the_token_cap_the_least_recently_used_go_first() -> None:
    store = StabilityStore(max_tokens=8)  # each record here is 2 prompt + 2 sampled tokens
    recorded(store, "s", "a:0", [7, 7])
    recorded(store, "s", "b:0", [7, 7])
    use(store, "s", "a:0")
    recorded(store, "s", "c:0", [7, 7])
    use(store, "s", "a:0")
    use(store, "s", "c:0")
    with pytest.raises(UserError, match="no recorded sequence 'b:0'"):
        use(store, "s", "b:0")
