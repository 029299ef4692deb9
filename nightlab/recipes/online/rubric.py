"""The fixed rubric of the online demo, and the simulated user who holds the same preference.

"Correct arithmetic, stated plainly and briefly": an answer to "What is a + b?" scores half for containing
the right number and half for brevity (full at `BRIEF_WORDS` words or fewer, shrinking with every word past
it). The rubric never learns: it is the verifier the promotion guard holds a new checkpoint to, which a
reward model being gamed cannot move.
"""

from __future__ import annotations

import re

BRIEF_WORDS = 6
_QUESTION = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)")
_NUMBER = re.compile(r"-?\d+")


def expected(prompt: str) -> int | None:
    """The answer to the first `a + b` or `a - b` in the prompt, if there is one."""
    found = _QUESTION.search(prompt)
    if found is None:
        return None
    a, op, b = int(found.group(1)), found.group(2), int(found.group(3))
    return a + b if op == "+" else a - b


def brevity(answer: str) -> float:
    words = len(answer.split())
    return 1.0 if words <= BRIEF_WORDS else BRIEF_WORDS / words


def brief_arithmetic(prompt: str, answer: str) -> float:
    """Half for the right number (when the prompt asks a sum), half for brevity: on [0, 1]."""
    want = expected(prompt)
    correct = want is not None and str(want) in _NUMBER.findall(answer)
    return 0.5 * float(correct) + 0.5 * brevity(answer)


def user_rating(prompt: str, answer: str) -> tuple[float, str | None]:
    """What the simulated user sends: +1 for an answer the rubric passes (>= 0.75), else -1 with the answer
    it wanted (the number alone) as the correction."""
    if brief_arithmetic(prompt, answer) >= 0.75:
        return 1.0, None
    want = expected(prompt)
    return -1.0, (str(want) if want is not None else None)
