"""Teachers for s1's collect step: whoever writes a `<think>` trace and an answer for a question.

`api` asks a model behind any OpenAI-compatible API (a provider, vLLM, another `nightlab serve`). `builtin`
needs no model and no network: it writes the worked step-by-step solution the problem generator produced, so
the whole pipeline runs offline with traces worth learning from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import openai

from nightlab.errors import NightlabError
from nightlab.recipes.common.chat_format import THINK_CLOSE, THINK_OPEN, answer_line
from nightlab.recipes.common.problems import Problem

TEACHERS = ("api", "builtin")
TEACHER_SYSTEM = (
    "Solve the problem. First think step by step between <think> and </think>. "
    "After </think>, write exactly one line: The answer is N."
)


class TeacherError(NightlabError):
    """The teacher could not answer one question; the message says why."""


@dataclass(frozen=True)
class Trace:
    """A teacher's reply: the text, and the thinking when an API returns it in a separate field."""

    content: str
    reasoning: str | None = None


class Teacher(Protocol):
    name: str

    def solve(self, problem: Problem) -> Trace: ...


class BuiltinTeacher:
    """The generator's worked solution as the thinking, then the answer line the recipes train and grade."""

    name = "builtin"

    def solve(self, problem: Problem) -> Trace:
        if not problem.solution:
            raise TeacherError(
                f"{problem.id} has no worked solution: the builtin teacher knows the built-in problems and "
                "questions files with a `solution` field; use --teacher api for the others"
            )
        return Trace(f"{THINK_OPEN}\n{problem.solution}\n{THINK_CLOSE}{answer_line(problem.answer)}")


class APITeacher:
    """A chat model behind an OpenAI-compatible API, asked to think between the delimiters."""

    def __init__(self, base_url: str, model: str, api_key: str | None, max_tokens: int) -> None:
        if not base_url or not model:
            raise TeacherError(
                "the api teacher needs --teacher-base-url and --teacher-model (or use --teacher builtin)"
            )
        self.name, self.max_tokens = model, max_tokens
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none", max_retries=2
        )

    def solve(self, problem: Problem) -> Trace:
        try:
            reply = self.client.chat.completions.create(
                model=self.name,
                messages=[
                    {"role": "system", "content": TEACHER_SYSTEM},
                    {"role": "user", "content": problem.question},
                ],
                max_tokens=self.max_tokens,
            )
        except openai.OpenAIError as exc:
            raise TeacherError(str(exc)) from exc
        message = reply.choices[0].message
        return Trace(message.content or "", getattr(message, "reasoning_content", None))


def make_teacher(kind: str, base_url: str, model: str, api_key: str | None, max_tokens: int) -> Teacher:
    if kind == "builtin":
        return BuiltinTeacher()
    if kind == "api":
        return APITeacher(base_url, model, api_key, max_tokens)
    raise TeacherError(f"unknown teacher {kind!r}: use {' or '.join(TEACHERS)}")
