"""Budget forcing's minimum through both client APIs, on the tiny model over real HTTP.

The tiny model never writes `</think>`, so each test makes a word of the model's own greedy output the
thinking delimiter: greedy decoding reaches that word again, tries to "close its thinking" there, and with a
minimum thinking length the service must take the word back and write "Wait" instead.
"""

from __future__ import annotations

import re

import openai
import pytest
import tinker

from nightlab.recipes.common.budget_forcing import budget_forcing, sample_with_budget_forcing
from nightlab.recipes.common.chat_format import chat_prompt

QUESTION = "What is 2 + 3?"
LENGTH = 24  # completion tokens; also the minimum thinking length, so no close may survive anywhere
WAIT = " Wait"


def closing_word(reference: str) -> str:
    """A word of the unforced output to act as the thinking delimiter."""
    words = [w for w in re.findall(r"[A-Za-z]{3,}", reference) if w not in WAIT]
    if not words:
        pytest.skip(f"no usable word in the tiny model's output {reference!r}")
    return words[len(words) // 2]


def forcing_at(word: str) -> dict:
    return budget_forcing(None, LENGTH, end_thinking=word, wait_text=WAIT, answer_prefix="")


def assert_close_became_wait(reference: str, forced: str, word: str) -> None:
    cut = forced.find("Wait")
    assert cut >= 0, forced  # "Wait" was inserted ...
    assert cut <= reference.index(word) + 1, (reference, forced)  # ... where the model first closed ...
    assert forced[:cut].rstrip() == reference[:cut].rstrip(), (
        reference,
        forced,
    )  # ... after the same thinking
    assert word not in forced, forced  # and no close survived before the minimum


def test_min_thinking_through_the_tinker_asample_extension(service, tiny_model, tokenizer) -> None:
    prompt = chat_prompt(tokenizer, QUESTION, think=True)
    params = tinker.SamplingParams(max_tokens=LENGTH, temperature=0.0)
    with tinker.ServiceClient(base_url=service.url, api_key=service.api_key) as client:
        sampler = client.create_sampling_client(base_model=str(tiny_model)).result()
        plain = sampler.sample(tinker.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    reference = tokenizer.decode(plain.tokens)
    word = closing_word(reference)

    response = sample_with_budget_forcing(
        service.url, service.api_key, str(tiny_model), prompt, params, forcing_at(word)
    )
    seq = response.sequences[0]
    assert_close_became_wait(reference, tokenizer.decode(seq.tokens), word)
    assert len(seq.tokens) == len(seq.logprobs) == LENGTH  # thought for at least the minimum

    with pytest.raises(ValueError, match="max_thinking_tokens"):
        sample_with_budget_forcing(
            service.url, service.api_key, str(tiny_model), prompt, params, budget_forcing(0)
        )


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_min_thinking_through_v1(service, tiny_model, tokenizer, endpoint: str) -> None:
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=service.api_key, max_retries=0)

    def complete(extra: dict | None) -> tuple[str, int]:
        common = dict(model=str(tiny_model), max_tokens=LENGTH, temperature=0, extra_body=extra)
        if (
            endpoint == "chat"
        ):  # the count starts at the first generated token, right after the assistant opening
            reply = client.chat.completions.create(messages=[{"role": "user", "content": QUESTION}], **common)
            return reply.choices[0].message.content or "", reply.usage.completion_tokens
        reply = client.completions.create(prompt=chat_prompt(tokenizer, QUESTION, think=True), **common)
        return reply.choices[0].text, reply.usage.completion_tokens

    reference, _ = complete(None)
    word = closing_word(reference)
    forced, tokens = complete({"budget_forcing": forcing_at(word)})
    assert_close_became_wait(reference, forced, word)
    assert tokens == LENGTH
