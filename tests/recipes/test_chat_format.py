"""The thinking chat format: prompts open thinking, the loss covers the assistant part only, answers grade."""

from __future__ import annotations

import pytest

from nightlab.recipes.common.chat_format import (
    THINK_CLOSE,
    THINK_OPEN,
    chat_prompt,
    graded_answer,
    reasoning_example,
    to_datum,
)


def test_prompt_uses_the_chat_template_and_opens_thinking(tokenizer) -> None:
    text = tokenizer.decode(chat_prompt(tokenizer, "What is 2 + 3?", think=True))
    assert text.startswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n" + THINK_OPEN + "\n")
    plain = tokenizer.decode(chat_prompt(tokenizer, "What is 2 + 3?", think=False))
    assert plain.endswith("assistant\n") and THINK_OPEN not in plain


def test_loss_mask_covers_exactly_the_assistant_turn(tokenizer) -> None:
    example = reasoning_example(tokenizer, "What is 2 + 3?", "two plus three is five", 5)
    prompt = chat_prompt(tokenizer, "What is 2 + 3?", think=True)
    assert example.tokens[: len(prompt)] == prompt
    assert example.weights == [0.0] * len(prompt) + [1.0] * (len(example.tokens) - len(prompt))
    learned = tokenizer.decode(example.tokens[len(prompt) :])
    assert learned == f"two plus three is five\n{THINK_CLOSE}\nThe answer is 5.<|im_end|>"
    assert example.tokens[-1] == tokenizer.eos_token_id


def test_datum_is_shifted_by_one(tokenizer) -> None:
    example = reasoning_example(tokenizer, "q", "t", 1)
    datum = to_datum(example)
    assert datum.model_input.to_ints() == example.tokens[:-1]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == example.tokens[1:]
    assert datum.loss_fn_inputs["weights"].tolist() == example.weights[1:]
    with pytest.raises(ValueError, match="two tokens"):
        to_datum(type(example)([1], [1.0]))


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3 plus 4 is 7\n</think>\nThe answer is 7.", 7),
        ("maybe 12 or 13 </think> The answer is -4.", -4),
        ("thinking about 12 and never closing", None),  # working numbers are not answers
        ("a </think> b </think> The answer is 9", 9),
    ],
)
def test_only_text_after_thinking_is_graded(completion: str, expected: int | None) -> None:
    assert graded_answer(completion) == expected
