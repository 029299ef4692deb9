"""RL environments: where prompts come from and how a completion is scored.

An environment is anything with `name`, `tasks(n, seed)` and `reward(task, completion)`; the RL loop needs
nothing else, so adding one is writing a class in any importable module and passing `module.path:factory` to
`load_env` (or `nightlab recipe rl --env module.path:factory`). The built-in `arithmetic` environment asks
small sums and differences and pays for a correct answer and for stating it in the one form the recipes grade.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from nightlab.recipes.common.problems import Problem, extract_answer


@dataclass(frozen=True)
class Task:
    """One prompt for the policy; `payload` carries whatever the environment needs to score it."""

    id: str
    user: str
    payload: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Reward:
    """A scalar reward plus named components logged per step (e.g. `correct`, `formatted`)."""

    value: float
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """What the RL loop asks of an environment."""

    name: str

    def tasks(self, n: int, seed: int) -> list[Task]:
        """`n` prompts, deterministic for a seed (each step draws fresh ones)."""
        ...

    def reward(self, task: Task, completion: str) -> Reward:
        """Score one completion of `task`."""
        ...


STATED_ANSWER = re.compile(r"answer is\s*-?\d+", re.IGNORECASE)


class ArithmeticEnv:
    """Small integer sums and differences: reward = correct + `format_bonus` when the answer is stated as
    asked.

    The format bonus gives a weak model a signal it can climb before it gets the arithmetic right, which is
    what makes reward visibly rise within a CPU budget.
    """

    name = "arithmetic"
    instruction = "Reply in the form: The answer is <number>."

    def __init__(self, max_operand: int = 20, format_bonus: float = 0.2) -> None:
        self.max_operand = max_operand
        self.format_bonus = format_bonus

    def problem(self, rng: random.Random, index: int) -> Problem:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice("+-")
        answer = a + b if op == "+" else a - b
        return Problem(f"arith-{index}", "arithmetic", f"What is {a} {op} {b}?", answer, 1)

    def tasks(self, n: int, seed: int) -> list[Task]:
        rng = random.Random(seed)
        out = []
        for i in range(n):
            p = self.problem(rng, i)
            out.append(Task(p.id, f"{p.question} {self.instruction}", {"answer": p.answer}))
        return out

    def reward(self, task: Task, completion: str) -> Reward:
        formatted = bool(STATED_ANSWER.search(completion))
        correct = extract_answer(completion) == task.payload["answer"]
        return Reward(
            float(correct) + self.format_bonus * float(formatted),
            {"correct": float(correct), "formatted": float(formatted)},
        )


BUILTIN: dict[str, Callable[[], Environment]] = {"arithmetic": ArithmeticEnv}


def load_env(spec: str) -> Environment:
    """A built-in name (`arithmetic`) or `package.module:factory`, where factory() returns an environment."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"unknown environment {spec!r}: use one of {', '.join(BUILTIN)} or 'package.module:factory'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load environment {spec!r}: {exc}") from exc
    env = factory()
    if not isinstance(env, Environment):
        raise ValueError(f"{spec!r} returned {type(env).__name__}, which lacks name/tasks/reward")
    return env
