"""Batched generation on the tiny model: every rule checked against a plain teacher-forced forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nightlab.train.errors import SamplingInputError
from nightlab.train.sampling import BudgetForcing, SampleRequest, SamplingParams, generate

TOL = 1e-4


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(lm):
    _, tok = lm
    texts = ["the answer is 12 + 5 =", "hi there", "what is the sum of many numbers and their result"]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, stop_at_eos=False, **kw)


def run(lm, *requests: SampleRequest):
    return generate(lm[0], lm[1], list(requests))


def forced_logprobs(lm, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log p(token_i | prompt, tokens_<i) from one full forward: the training side's view of a sample."""
    model, _ = lm
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return logp


def assert_teacher_forced(lm, prompt, seq) -> None:
    logp = forced_logprobs(lm, prompt, seq.tokens)
    expected = logp.gather(1, torch.tensor(seq.tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(seq.logprobs), expected, atol=TOL)


def test_greedy_is_argmax_of_the_teacher_forced_forward(lm, prompts):
    seq = run(lm, SampleRequest(prompts[0], greedy(12)))[0].sequences[0]
    assert len(seq.tokens) == 12 and seq.stop_reason == "length"
    logp = forced_logprobs(lm, prompts[0], seq.tokens)
    assert seq.tokens == logp.argmax(-1).tolist()
    assert_teacher_forced(lm, prompts[0], seq)


def test_sampled_logprobs_are_raw_model_logprobs(lm, prompts):
    """Temperature/top-k/top-p shape the choice, but logprobs are the model's own (what RL compares with)."""
    params = SamplingParams(max_tokens=16, temperature=0.7, top_k=20, top_p=0.9, seed=1, stop_at_eos=False)
    seq = run(lm, SampleRequest(prompts[0], params))[0].sequences[0]
    assert_teacher_forced(lm, prompts[0], seq)
    ranks = forced_logprobs(lm, prompts[0], seq.tokens).argsort(-1, descending=True)
    for i, token in enumerate(seq.tokens):
        assert token in ranks[i, :20].tolist()


def test_seeded_request_reproduces_whatever_its_batch_mates(lm, prompts):
    seeded = SampleRequest(
        prompts[1], SamplingParams(max_tokens=20, seed=7, stop_at_eos=False), num_samples=3
    )
    alone = run(lm, seeded)[0]
    mate = SampleRequest(prompts[2], SamplingParams(max_tokens=5, seed=3))
    batched = run(lm, mate, seeded, mate)[1]
    assert [s.tokens for s in batched.sequences] == [s.tokens for s in alone.sequences]
    assert len({tuple(s.tokens) for s in alone.sequences}) == 3  # the samples differ from each other
    other = run(lm, dataclasses.replace(seeded, params=dataclasses.replace(seeded.params, seed=8)))[0]
    assert other.sequences[0].tokens != alone.sequences[0].tokens
    for s in alone.sequences:
        assert_teacher_forced(lm, prompts[1], s)


def test_batch_of_mixed_requests_equals_each_run_alone(lm, prompts):
    requests = [
        SampleRequest(prompts[0], greedy(10)),
        SampleRequest(prompts[1], greedy(3), num_samples=2),
        SampleRequest(prompts[2], greedy(7), prompt_logprobs=True),
    ]
    together = run(lm, *requests)
    for request, result in zip(requests, together, strict=True):
        alone = run(lm, request)[0]
        assert [s.tokens for s in result.sequences] == [s.tokens for s in alone.sequences]
        assert [len(s.tokens) for s in result.sequences] == [request.params.max_tokens] * request.num_samples
        for a, b in zip(result.sequences, alone.sequences, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=TOL)


def test_stop_token_ids_strings_eos_and_length(lm, prompts):
    model, tok = lm
    ref = run(lm, SampleRequest(prompts[0], greedy(20)))[0].sequences[0].tokens
    k = 5
    by_id = run(lm, SampleRequest(prompts[0], greedy(20, stop_token_ids=[ref[k]])))[0].sequences[0]
    first = ref.index(ref[k])
    assert by_id.tokens == ref[: first + 1] and by_id.stop_reason == "stop"  # the stop token is returned

    stop = tok.decode(ref[k : k + 2])
    by_text = run(lm, SampleRequest(prompts[0], greedy(20, stop_strings=[stop])))[0].sequences[0]
    assert by_text.stop_reason == "stop" and by_text.tokens == ref[: len(by_text.tokens)]
    assert stop in tok.decode(by_text.tokens)  # the tokens completing the stop string are returned
    assert stop not in tok.decode(by_text.tokens[:-1])  # ... and nothing after them

    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = ref[k]  # pretend this token is the model's EOS
    try:
        with_eos = run(lm, SampleRequest(prompts[0], SamplingParams(max_tokens=20, temperature=0.0)))[0]
        without = run(lm, SampleRequest(prompts[0], greedy(20)))[0]
    finally:
        model.generation_config.eos_token_id = old
    assert with_eos.sequences[0].tokens == ref[: first + 1] and with_eos.sequences[0].stop_reason == "stop"
    assert without.sequences[0].tokens == ref and without.sequences[0].stop_reason == "length"
    empty = run(lm, SampleRequest(prompts[0], greedy(0)))[0].sequences[0]
    assert empty.tokens == [] and empty.stop_reason == "length"


def test_prompt_logprobs_and_topk(lm, prompts):
    prompt = prompts[2]
    result = run(
        lm,
        SampleRequest(prompts[1], greedy(2)),  # a shorter batch mate shifts this prompt's padding
        SampleRequest(
            prompt, greedy(1), prompt_logprobs=True, topk_prompt_logprobs=4, topk_sample_logprobs=3
        ),
    )[1]
    logp = forced_logprobs(lm, prompt[:1], prompt[1:])
    assert result.prompt_logprobs[0] is None and result.topk_prompt_logprobs[0] is None
    expected = logp.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(result.prompt_logprobs[1:]), expected, atol=TOL)
    assert len(result.topk_prompt_logprobs) == len(prompt)
    for i, top in enumerate(result.topk_prompt_logprobs[1:]):
        values, ids = logp[i].topk(4)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=TOL)
    seq = result.sequences[0]
    assert len(seq.topk_logprobs) == 1 and seq.topk_logprobs[0][0][0] == seq.tokens[0]  # greedy: top-1


def test_on_token_reports_every_final_token_in_order(lm, prompts):
    seen: list[tuple[int, int]] = []
    request = SampleRequest(prompts[0], SamplingParams(max_tokens=6, seed=2), num_samples=2)
    request.on_token = lambda sample, token: seen.append((sample, token))
    result = run(lm, request)[0]
    for j, seq in enumerate(result.sequences):
        assert [t for s, t in seen if s == j] == seq.tokens


def _clean_delimiter(tok, ref: list[int], start: int) -> int:
    """An index k >= start whose token's text first appears in the output exactly at token k."""
    for k in range(start, len(ref)):
        piece = tok.decode([ref[k]])
        if (
            piece.strip().isalpha()
            and piece not in tok.decode(ref[:k])
            and tok.decode(ref[: k + 1]).endswith(piece)
        ):
            return k
    pytest.skip("no clean delimiter in this model's greedy output")


@pytest.mark.parametrize("start", [0, 2])
def test_budget_forcing_min_takes_back_the_close_and_says_wait(lm, prompts, start):
    _, tok = lm
    prompt = prompts[0]
    ref = run(lm, SampleRequest(prompt, greedy(30)))[0].sequences[0].tokens
    k = _clean_delimiter(tok, ref, start)
    delimiter = tok.decode([ref[k]])
    bf = BudgetForcing(min_thinking_tokens=k + 4, end_thinking=delimiter, wait_text=" Wait")
    seq = run(lm, SampleRequest(prompt, greedy(k + 8), budget_forcing=bf))[0].sequences[0]
    wait = tok.encode(" Wait", add_special_tokens=False)
    assert seq.tokens[:k] == ref[:k]
    assert seq.tokens[k : k + len(wait)] == wait  # the delimiter was replaced by "Wait"
    assert delimiter not in tok.decode(seq.tokens[: k + len(wait)])
    assert len(seq.tokens) == k + 8
    assert_teacher_forced(lm, prompt, seq)  # the taken-back tokens left no trace in the cache


def test_budget_forcing_max_forces_the_delimiter_and_answer(lm, prompts):
    _, tok = lm
    prompt = prompts[0]
    ref = run(lm, SampleRequest(prompt, greedy(5)))[0].sequences[0].tokens
    bf = BudgetForcing(max_thinking_tokens=5, end_thinking="</think>", answer_prefix="\nAnswer:")
    seq = run(lm, SampleRequest(prompt, greedy(20), budget_forcing=bf))[0].sequences[0]
    forced = tok.encode("</think>\nAnswer:", add_special_tokens=False)
    assert seq.tokens[:5] == ref
    assert seq.tokens[5 : 5 + len(forced)] == forced
    assert len(seq.tokens) == 20 and seq.stop_reason == "length"
    assert_teacher_forced(lm, prompt, seq)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (SampleRequest([], SamplingParams()), "empty"),
        (SampleRequest([1, 10**6], SamplingParams()), "outside the vocabulary"),
        (SampleRequest([1], SamplingParams(max_tokens=10**6)), "context length"),
        (SampleRequest([1], SamplingParams(top_p=0.0)), "top_p"),
        (SampleRequest([1], SamplingParams(temperature=-1)), "temperature"),
        (SampleRequest([1], SamplingParams(), num_samples=0), "num_samples"),
        (SampleRequest([1], SamplingParams(), budget_forcing=BudgetForcing(wait_text="")), "wait_text"),
        (
            SampleRequest([1], SamplingParams(), topk_sample_logprobs=100_000),
            "topk_sample_logprobs must be between 0 and the vocabulary size 512",
        ),
        (
            SampleRequest([1], SamplingParams(), topk_prompt_logprobs=513),
            "topk_prompt_logprobs must be between 0 and the vocabulary size 512",
        ),
    ],
)
def test_bad_requests_are_refused_before_any_work(lm, prompts, request_, message):
    good = SampleRequest(prompts[0], greedy(2))
    with pytest.raises(SamplingInputError, match=message):
        run(lm, good, request_)


def test_topk_may_span_the_whole_vocabulary(lm, prompts):
    vocab = lm[0].get_input_embeddings().num_embeddings
    request = SampleRequest(prompts[0], greedy(1), topk_prompt_logprobs=vocab, topk_sample_logprobs=vocab)
    result = run(lm, request)[0]
    assert len(result.sequences[0].topk_logprobs[0]) == vocab == len(result.topk_prompt_logprobs[1])
