"""The proposer's memory of a run: within its token budget by a real tokenizer, and what it keeps."""

from __future__ import annotations

import pytest

from benchmarks.agent_memory import CRASHES, DEAD_END, facts, synthetic_history
from nightlab.research.memory import render_memory, token_counter, topic
from nightlab.research.proposers.base import PastExperiment

HISTORY = synthetic_history()


@pytest.fixture(scope="module")
def count():
    return token_counter(None)  # SmolLM2's tokenizer, from the offline model


@pytest.mark.parametrize("budget", [200, 1000, 4000])
@pytest.mark.parametrize("n", [1, 2, 10, 50, 200, 500])
def test_the_memory_never_exceeds_its_budget(count, budget, n):
    text = render_memory(HISTORY[:n], "minimize", "val_bpb", budget, count)
    assert 0 < count(text) <= budget
    assert text.startswith(f"{n} experiments")


def test_at_4k_tokens_every_planted_fact_of_500_experiments_is_remembered(count):
    text = render_memory(HISTORY, "minimize", "val_bpb", 4000, count)
    assert all(facts(text).values()), {k: v for k, v in facts(text).items() if not v}


def test_repeats_and_failures_are_counted_in_one_line_each(count):
    text = render_memory(HISTORY, "minimize", "val_bpb", 4000, count)
    numbers = ", #".join(str(n) for n in DEAD_END)
    assert "- 3 changes to OPTIMIZER: 3 discard; best " in text and f"(#{numbers})" in text
    assert f"- {len(CRASHES)} x crash: RuntimeError: CUDA out of memory" in text


def test_the_same_history_renders_the_same_text(count):
    first = render_memory(HISTORY, "minimize", "val_bpb", 2000, count)
    assert first == render_memory(list(HISTORY), "minimize", "val_bpb", 2000, count)


def test_a_maximized_metric_calls_the_highest_best_and_an_empty_history_says_so(count):
    history = [PastExperiment(i, f"try {i}", "discard", float(i)) for i in range(1, 6)]
    assert render_memory(history, "maximize", "acc", 1000, count).startswith("5 experiments; best acc 5 (#5")
    assert render_memory([], "minimize", "loss", 1000, count) == "None yet besides the baseline."


def test_an_idea_is_the_names_its_change_assigns_or_its_knobs():
    patch = "-LR = 0.1\n+LR = 0.2\n-    depth += 1\n+WIDTH: int = 4\n"
    assert topic(PastExperiment(1, "x", "discard", 1.0, patch=patch)) == "LR, WIDTH, depth"
    assert topic(PastExperiment(2, "x", "discard", 1.0, params={"MOMENTUM": 0.9})) == "MOMENTUM"
    assert topic(PastExperiment(3, "x", "discard", 1.0)) == ""
