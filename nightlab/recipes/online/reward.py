"""Reward models for the online loop, and how well they agree with the people whose feedback they learn.

A reward model scores an answer to a prompt on [0, 1] and takes feedback events (`GET /v1/feedback` rows)
as they arrive. `JudgeReward` asks any OpenAI-compatible chat model to grade each answer against the rubric
you write; its update is in context: the judge sees the latest rated answers (with the users' ratings and
corrections) as examples of what they want, so its grades follow the feedback without a training step.
Held-out events (one in `HELDOUT_EVERY`, chosen by id, so the split never changes) are never shown to it:
they measure its agreement with the people (how often it ranks a liked answer above a disliked one), which
the promotion guard watches for a fall.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, Protocol

import openai

from nightlab.errors import NightlabError

HELDOUT_EVERY = 4
MIN_PAIRS = 10  # (liked, disliked) pairs of held-out events before agreement is measured
_SCORE = re.compile(r"-?\d+(?:\.\d+)?")
JUDGE_SYSTEM = (
    "You grade an assistant's answer for the people who use it. Reply with one number from 0 (what they do "
    "not want) to 10 (exactly what they want), and nothing else."
)


class RewardError(NightlabError, RuntimeError):
    """The reward model could not score an answer; the message says why."""


class RewardModel(Protocol):
    name: str

    def score(self, prompt: str, answer: str) -> float:
        """How much the users would want `answer` to `prompt`, on [0, 1]."""
        ...

    def update(self, events: Sequence[dict[str, Any]]) -> None:
        """Learn from rated answers (training events only: see `split`)."""
        ...


def is_heldout(event: dict[str, Any]) -> bool:
    digest = hashlib.sha256(f"{event['id']}:{event['choice']}".encode()).digest()
    return digest[0] % HELDOUT_EVERY == 0


def split(events: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training events, held-out events), the same split every time an event is seen."""
    train = [e for e in events if not is_heldout(e)]
    return train, [e for e in events if is_heldout(e)]


def user_text(prompt: Any) -> str:
    """The last user turn of a chat prompt (messages) or a completion prompt as it is."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return str(users[-1] if users else prompt[-1].get("content", ""))
    return str(prompt)


def agreement(model: RewardModel, events: Sequence[dict[str, Any]]) -> float | None:
    """How often the model ranks an answer the people liked above one they disliked, over every such pair of
    rated answers (a tie counts half): no threshold to tune, so a model whose scale differs from the users'
    is not counted as disagreeing. None below `MIN_PAIRS` pairs, where one event would swing it."""
    liked = [model.score(user_text(e["prompt"]), e["answer"]) for e in events if e["rating"] > 0]
    disliked = [model.score(user_text(e["prompt"]), e["answer"]) for e in events if e["rating"] < 0]
    pairs = len(liked) * len(disliked)
    if pairs < MIN_PAIRS:
        return None
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in liked for b in disliked)
    return wins / pairs


class JudgeReward:
    """A judge model over any OpenAI-compatible API, shown the rubric and the latest rated answers."""

    name = "judge"

    def __init__(
        self, base_url: str, model: str, api_key: str | None, rubric: str, shots: int = 8, timeout: float = 60
    ) -> None:
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2
        )
        self.model, self.rubric, self.shots = model, rubric, shots
        self.examples: list[dict[str, Any]] = []
        self.cache: dict[tuple[str, str, int], float] = {}

    def update(self, events: Sequence[dict[str, Any]]) -> None:
        self.examples = [*self.examples, *events][-self.shots :]

    def _prompt(self, prompt: str, answer: str) -> str:
        parts = [f"What the users want: {self.rubric}"]
        for e in self.examples:
            verdict = "liked" if e["rating"] > 0 else "disliked" if e["rating"] < 0 else "neutral on"
            line = f"- They {verdict} this answer to {user_text(e['prompt'])!r}: {e['answer']!r}"
            if e.get("correction"):
                line += f" (they wanted: {e['correction']!r})"
            parts.append(line)
        parts.append(f"Question: {prompt}\nAnswer: {answer}\nGrade (0-10):")
        return "\n".join(parts)

    def score(self, prompt: str, answer: str) -> float:
        key = (prompt, answer, len(self.examples))
        if key in self.cache:
            return self.cache[key]
        messages = [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": self._prompt(prompt, answer)},
        ]
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0)
        except openai.OpenAIError as exc:
            raise RewardError(f"the judge ({self.model}) did not answer: {exc}") from exc
        text = (reply.choices[0].message.content or "") if reply.choices else ""
        found = _SCORE.search(text)
        if found is None:
            raise RewardError(f"the judge ({self.model}) gave no grade: {text[:200]!r}")
        value = min(max(float(found.group()) / 10.0, 0.0), 1.0)
        self.cache[key] = value
        return value
