"""Built-in problems with verifiable answers, so reasoning recipes run with no network and no data set.

Each problem has a type (for diversity balancing), a difficulty estimate, and an integer answer that
`check_answer` verifies from a model's free-form text.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

PROBLEM_TYPES = ("addition", "subtraction", "multiplication", "multi_step", "word_shopping", "word_age")
ANSWER_PATTERN = re.compile(r"(?:answer|Answer|ANSWER)\s*(?:is|:)?\s*\$?\\?(?:boxed\{)?\s*(-?\d[\d,]*)")
LAST_INTEGER = re.compile(r"-?\d[\d,]*")


@dataclass(frozen=True)
class Problem:
    """One question with its verified integer answer."""

    id: str
    type: str
    question: str
    answer: int
    difficulty: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _make(rng: random.Random, kind: str, index: int) -> Problem:
    if kind == "addition":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        q, ans, diff = f"What is {a} + {b}?", a + b, len(str(a + b))
    elif kind == "subtraction":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        q, ans, diff = f"What is {a} - {b}?", a - b, len(str(abs(a - b))) + 1
    elif kind == "multiplication":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        q, ans, diff = f"What is {a} * {b}?", a * b, len(str(a * b)) + 1
    elif kind == "multi_step":
        a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 20)
        q, ans, diff = f"What is ({a} + {b}) * {c}?", (a + b) * c, 5
    elif kind == "word_shopping":
        n, price, paid = rng.randint(2, 9), rng.randint(2, 15), 0
        paid = n * price + rng.randint(0, 20)
        q = (
            f"Sam buys {n} notebooks that cost {price} dollars each and pays with {paid} dollars. "
            "How many dollars of change does Sam get?"
        )
        ans, diff = paid - n * price, 4
    elif kind == "word_age":
        age, years, factor = rng.randint(3, 30), rng.randint(2, 15), rng.randint(2, 4)
        q = (
            f"Ana is {age} years old. Her aunt is {factor} times as old as Ana. "
            f"How old will her aunt be in {years} years?"
        )
        ans, diff = age * factor + years, 4
    else:
        raise ValueError(f"unknown problem type {kind!r}; choose from {', '.join(PROBLEM_TYPES)}")
    return Problem(id=f"{kind}-{index}", type=kind, question=q, answer=ans, difficulty=diff)


def generate_problems(n: int, seed: int = 0, types: tuple[str, ...] = PROBLEM_TYPES) -> list[Problem]:
    """`n` problems cycling through `types`, deterministic for a seed."""
    rng = random.Random(seed)
    return [_make(rng, types[i % len(types)], i) for i in range(n)]


def extract_answer(text: str) -> int | None:
    """The integer a response commits to: an explicit 'answer is N' / boxed N, else the last integer."""
    explicit = ANSWER_PATTERN.findall(text)
    candidates = explicit or LAST_INTEGER.findall(text)
    if not candidates:
        return None
    try:
        return int(candidates[-1].replace(",", ""))
    except ValueError:
        return None


def check_answer(text: str, answer: int) -> bool:
    """True when the response's committed answer equals the verified one."""
    return extract_answer(text) == answer


def read_problems(path: Path) -> Iterator[Problem]:
    """Problems from a jsonl file with `question` and `answer` (plus optional `type`, `id`, `difficulty`)."""
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield Problem(
                    id=str(row.get("id", f"{Path(path).stem}-{lineno}")),
                    type=str(row.get("type", "custom")),
                    question=str(row["question"]),
                    answer=int(row["answer"]),
                    difficulty=int(row.get("difficulty", 0)),
                )
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: need `question` and an integer `answer` ({exc})") from exc
