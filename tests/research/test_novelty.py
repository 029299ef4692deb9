"""What the novelty gate counts as the same code, and the tuner's way off a plateau."""

from __future__ import annotations

import optuna
import pytest

from nightlab.research.novelty import fingerprint
from nightlab.research.proposers.base import PastExperiment, ProposalContext
from nightlab.research.proposers.tune import TuneProposer, TuneSection

CODE = '''"""A module."""
import math

RATE = 0.5


def step(x):
    """Take one step."""
    return x - RATE * math.sin(x)
'''


@pytest.mark.parametrize(
    "variant",
    [
        CODE.replace("RATE = 0.5", "RATE = 0.50  # tuned by hand"),
        CODE.replace('"""Take one step."""', '"""Another docstring."""').replace("\n\n\ndef", "\n\ndef"),
        CODE.replace('"""A module."""\n', "").replace("x - RATE", "x-RATE"),
        CODE.replace("RATE = 0.5", "RATE = 5e-1"),
    ],
)
def test_layout_comments_and_docstrings_do_not_make_python_new(variant):
    assert fingerprint({"train.py": variant}) == fingerprint({"train.py": CODE})


@pytest.mark.parametrize(
    "variant",
    [
        CODE.replace("RATE = 0.5", "RATE = 0.6"),
        CODE.replace("math.sin", "math.cos"),
        CODE.replace('"""Take one step."""', 'print("step")'),
    ],
)
def test_any_change_to_what_python_does_is_new(variant):
    assert fingerprint({"train.py": variant}) != fingerprint({"train.py": CODE})


def test_other_files_and_unparsable_python_compare_as_text_without_trailing_space_or_blank_lines():
    text = "lr: 0.1\nwidth: 4\n"
    assert fingerprint({"c.yaml": "lr: 0.1   \n\nwidth: 4"}) == fingerprint({"c.yaml": text})
    assert fingerprint({"c.yaml": "lr: 0.2\nwidth: 4\n"}) != fingerprint({"c.yaml": text})
    broken = "def f(:\n    return 1\n"
    assert fingerprint({"t.py": broken + "\n\n"}) == fingerprint({"t.py": broken})
    assert fingerprint({"t.py": broken.replace("1", "2")}) != fingerprint({"t.py": broken})
    # The file a text lives in matters.
    assert fingerprint({"a.yaml": text}) != fingerprint({"b.yaml": text})


def _context(plateau: int, history: list[PastExperiment]) -> ProposalContext:
    files = {"train.py": "LR = 0.01\nWIDTH = 8\n"}
    return ProposalContext("", files, "loss", "minimize", 1.0, 0.1, history, plateau=plateau)


def test_on_a_plateau_the_tuner_samples_at_random():
    """Past TPE's start-up trials, a plateau draws the next values from a seeded random sampler."""
    section = TuneSection(seed=3)
    files = {"train.py": "LR = 0.01\nWIDTH = 8\n"}
    past = [
        PastExperiment(i, f"t{i}", "discard", 1 + (0.1 * i) ** 2, params={"LR": 0.002 * (i + 1), "WIDTH": 8})
        for i in range(12)
    ]
    proposals = {}
    for plateau in (0, 12):
        tuner = TuneProposer(section, files, "minimize")
        proposals[plateau] = tuner.propose(_context(plateau, past))
        assert isinstance(tuner.study.sampler, optuna.samplers.TPESampler)  # back to TPE afterwards
    random = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).ask(tuner.space).params
    assert proposals[12].params == pytest.approx({k: float(v) for k, v in random.items()}, rel=1e-3)
    assert proposals[0].params != proposals[12].params
