"""Built-in problems with verifiable answers, so reasoning recipes run with no network and no data set.

Each problem has a type (for diversity balancing), a difficulty estimate, an integer answer that
`check_answer` verifies from a model's free-form text, and a worked step-by-step solution (what s1's offline
`builtin` teacher writes as its thinking).
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
    """One question with its verified integer answer and, for generated ones, a worked step-by-step
    solution."""

    id: str
    type: str
    question: str
    answer: int
    difficulty: int
    solution: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _place_values(n: int) -> list[int]:
    """The non-zero place parts of a positive integer, largest first: 405 -> [400, 5]."""
    digits = str(n)
    parts = [int(d) * 10 ** (len(digits) - i - 1) for i, d in enumerate(digits)]
    return [part for part in parts if part]


def _add_steps(a: int, b: int, sign: int = 1) -> tuple[list[str], int]:
    """`a + b` (or `a - b` with sign -1) one place value of `b` at a time."""
    op = "+" if sign > 0 else "-"
    parts = _place_values(b)
    lines = [f"Split {b} into {' + '.join(map(str, parts))}."] if len(parts) > 1 else []
    total = a
    for part in parts:
        lines.append(f"{total} {op} {part} = {total + sign * part}.")
        total += sign * part
    return lines, total


def _mul_steps(a: int, b: int) -> tuple[list[str], int]:
    """`a * b` as the smaller factor times each place value of the larger, then the partial products
    summed."""
    small, big = sorted((a, b))
    parts = _place_values(big)
    if len(parts) == 1:
        return [f"{small} * {big} = {small * big}."], small * big
    lines = [f"Split {big} into {' + '.join(map(str, parts))}."]
    lines += [f"{small} * {part} = {small * part}." for part in parts]
    total = small * parts[0]
    for part in parts[1:]:
        lines.append(f"{total} + {small * part} = {total + small * part}.")
        total += small * part
    return lines, total


def _make(rng: random.Random, kind: str, index: int) -> Problem:
    if kind == "addition":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        steps, ans = _add_steps(a, b)
        q, diff = f"What is {a} + {b}?", len(str(ans))
    elif kind == "subtraction":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        steps, ans = _add_steps(a, b, sign=-1)
        q, diff = f"What is {a} - {b}?", len(str(abs(ans))) + 1
    elif kind == "multiplication":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        steps, ans = _mul_steps(a, b)
        q, diff = f"What is {a} * {b}?", len(str(ans)) + 1
    elif kind == "multi_step":
        a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 20)
        product, ans = _mul_steps(a + b, c)
        q, diff = f"What is ({a} + {b}) * {c}?", 5
        steps = [f"First the parentheses: {a} + {b} = {a + b}.", f"Then {a + b} * {c}.", *product]
    elif kind == "word_shopping":
        n, price = rng.randint(2, 9), rng.randint(2, 15)
        paid = n * price + rng.randint(0, 20)
        q = (
            f"Sam buys {n} notebooks that cost {price} dollars each and pays with {paid} dollars. "
            "How many dollars of change does Sam get?"
        )
        ans, diff = paid - n * price, 4
        steps = [
            f"The notebooks cost {n} * {price} = {n * price} dollars.",
            f"The change is {paid} - {n * price} = {ans} dollars.",
        ]
    elif kind == "word_age":
        age, years, factor = rng.randint(3, 30), rng.randint(2, 15), rng.randint(2, 4)
        q = (
            f"Ana is {age} years old. Her aunt is {factor} times as old as Ana. "
            f"How old will her aunt be in {years} years?"
        )
        ans, diff = age * factor + years, 4
        steps = [
            f"The aunt is {factor} * {age} = {age * factor} years old now.",
            f"In {years} years she will be {age * factor} + {years} = {ans}.",
        ]
    else:
        raise ValueError(f"unknown problem type {kind!r}; choose from {', '.join(PROBLEM_TYPES)}")
    solution = "\n".join([*steps, f"So the answer is {ans}."])
    return Problem(
        id=f"{kind}-{index}", type=kind, question=q, answer=ans, difficulty=diff, solution=solution
    )


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
    """Problems from a jsonl file with `question` and `answer` (optional: `type`, `id`, `difficulty`,
    `solution`)."""
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
                    solution=str(row.get("solution", "")),
                )
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: need `question` and an integer `answer` ({exc})") from exc
