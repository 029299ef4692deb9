"""The reasoning chat format: prompt tokens that open a thinking section, and SFT examples with a loss mask.

Training and sampling must agree token for token, so both build prompts here. The prompt is the model's own
chat template up to the assistant turn followed by `<think>\\n`; the completion is the thinking, `</think>`,
one answer line in a fixed form, and the end-of-turn token. Budget forcing relies on the same two pieces: it
starts counting inside the opened thinking section and, at the limit, forces `</think>` plus `ANSWER_PREFIX`,
which is exactly the text the model was trained to write there.
"""

from __future__ import annotations

from dataclasses import dataclass

import tinker

from nightlab.recipes.common.problems import extract_answer

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_PREFIX = "\nThe answer is "


@dataclass(frozen=True)
class Example:
    """Token ids of one conversation and a 0/1 weight per token (1 = the model learns to write it)."""

    tokens: list[int]
    weights: list[float]


def chat_prompt(tokenizer, user: str, *, think: bool) -> list[int]:
    """Tokens of `user`'s turn and the assistant's opening, plus an opened thinking section when `think`.

    Models without a chat template get a plain "Question/Answer" layout so the recipes still run on base
    models.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = f"Question: {user}\nAnswer: "
    if think:
        text += THINK_OPEN + "\n"
    return tokenizer.encode(text, add_special_tokens=False)


def end_of_turn(tokenizer) -> int:
    """The token that ends an assistant turn: the tokenizer's EOS, which the sampler also stops on."""
    if tokenizer.eos_token_id is None:
        raise ValueError("this tokenizer has no EOS token; the chat format needs one to end a turn")
    return int(tokenizer.eos_token_id)


def answer_line(answer: int) -> str:
    """The one answer form the recipes train and grade: the forced prefix, the integer, a full stop."""
    return f"{ANSWER_PREFIX}{answer}."


def reasoning_example(tokenizer, question: str, thinking: str, answer: int) -> Example:
    """A full thinking conversation; only the assistant's thinking, answer line and end-of-turn carry loss."""
    prompt = chat_prompt(tokenizer, question, think=True)
    completion = tokenizer.encode(
        f"{thinking.strip()}\n{THINK_CLOSE}{answer_line(answer)}", add_special_tokens=False
    )
    completion.append(end_of_turn(tokenizer))
    return Example(prompt + completion, [0.0] * len(prompt) + [1.0] * len(completion))


def to_datum(example: Example) -> tinker.Datum:
    """Shift by one for next-token prediction: position i of the input predicts token i + 1."""
    if len(example.tokens) < 2:
        raise ValueError("an example needs at least two tokens")
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(example.tokens[:-1]),
        loss_fn_inputs={"target_tokens": example.tokens[1:], "weights": example.weights[1:]},
    )


def graded_answer(completion: str) -> int | None:
    """The answer a thinking completion commits to: only text after the last `</think>` counts.

    Numbers inside an unfinished thinking section are working, not answers, so a model that never closes its
    thinking gets no credit.
    """
    _, sep, tail = completion.rpartition(THINK_CLOSE)
    if not sep:
        return None
    return extract_answer(tail)
