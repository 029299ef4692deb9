"""How much of a long night a proposer's brief remembers at a fixed token budget: nightlab's memory against
last-N truncation and one rolling summary.

A synthetic 500-experiment history plants facts an agent needs: the path to the best (8 kept changes, from
early to late), a dead end tried three times, the cause of a cluster of crashes, and a promising near miss.
Each method renders the history within 2k, 4k and 8k tokens (SmolLM2's tokenizer); a deterministic checker
asks the rendered text for each fact. Goal: >= 90% recall at 4k where truncation gets <= 50%, and tokens
per turn flat from 50 to 500 experiments.

    .venv/bin/python benchmarks/agent_memory.py
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from nightlab.research.memory import TokenCounter, line, render_memory, token_counter
from nightlab.research.proposers.base import PastExperiment

KEPT = {
    20: "cosine schedule",
    70: "rotary embeddings",
    130: "qk-norm",
    190: "wider MLP",
    260: "muon optimizer",
    330: "value embeddings",
    400: "longer warmdown",
    470: "tied embeddings",
}
DEAD_END = (40, 210, 420)  # "swap the optimizer to lion", discarded three times
CRASHES = (55, 56, 160, 161, 300, 440)  # out of memory, each with other numbers
NEAR_MISS = 350
KNOBS = ["LEARNING_RATE", "DROPOUT", "WARMUP_STEPS", "WEIGHT_DECAY", "DEPTH", "HEAD_DIM", "SOFTCAP"]
Method = Callable[[list[PastExperiment], int, TokenCounter], str]


def diff(name: str, old: str, new: str) -> str:
    return f"--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-{name} = {old}\n+{name} = {new}\n"


def synthetic_history(n: int = 500, seed: int = 0) -> list[PastExperiment]:
    """A night of experiments with the planted facts at fixed numbers, the rest seeded noise."""
    rng = random.Random(seed)
    best, out = 2.0, []
    for i in range(1, n + 1):
        if i in KEPT:
            best -= 0.05
            name = re.sub(r"\W", "_", KEPT[i].upper())
            out.append(PastExperiment(i, KEPT[i], "keep", best, "confirmed", diff(name, "0", "1"), {}, 5.0))
        elif i in DEAD_END:
            patch = diff("OPTIMIZER", '"adamw"', '"lion"')
            out.append(
                PastExperiment(i, "swap the optimizer to lion", "discard", best + 0.04, "worse", patch)
            )
        elif i in CRASHES:
            batch = rng.choice([256, 512])
            reason = f"RuntimeError: CUDA out of memory. Tried to allocate {rng.randint(2, 9)} GiB ({batch=})"
            out.append(
                PastExperiment(i, "bigger batch", "crash", None, reason, diff("BATCH_SIZE", "64", f"{batch}"))
            )
        elif i == NEAR_MISS:
            patch = diff("FUSED_ATTENTION", "False", "True")
            missed = PastExperiment(
                i, "fused attention kernel", "discard", best - 0.009, "not confirmed", patch
            )
            out.append(replace(missed, sigmas=1.8))
        else:
            knob, value, sigmas = rng.choice(KNOBS), round(rng.uniform(0.1, 2.0), 3), rng.gauss(-1.0, 1.0)
            patch = diff(knob, "1.0", str(value))
            tried = PastExperiment(
                i, f"set {knob.lower()} to {value}", "discard", best - sigmas * 0.005, "", patch
            )
            out.append(replace(tried, reason="within the noise or worse", sigmas=sigmas))
    return out


def facts(text: str) -> dict[str, bool]:
    """Which planted facts the text states (the checker)."""
    found = {f"path: {name}": name in text for name in KEPT.values()}
    order = [text.find(name) for name in KEPT.values()]
    found["path: in order"] = -1 not in order and order == sorted(order)
    found["dead end: lion tried 3 times, discarded"] = bool(
        re.search(r"3 changes to OPTIMIZER: 3 discard", text)
        or all(f"#{n} discard" in text and "lion" in text for n in DEAD_END)
    )
    found["crash cause: out of memory at large BATCH_SIZE"] = "out of memory" in text and "BATCH_SIZE" in text
    found["near miss: #350 fused attention"] = f"#{NEAR_MISS}" in text and "fused attention kernel" in text
    return found


def memory(history: list[PastExperiment], budget: int, count: TokenCounter) -> str:
    return render_memory(history, "minimize", "val_bpb", budget, count)


def truncation(history: list[PastExperiment], budget: int, count: TokenCounter) -> str:
    """The newest experiments that fit, one line each, oldest first."""
    lines, used = [], 0
    for past in reversed(history):
        cost = count(line(past)) + 1
        if used + cost > budget:
            break
        lines.insert(0, line(past))
        used += cost
    return "\n".join(lines)


def rolling_summary(history: list[PastExperiment], budget: int, count: TokenCounter) -> str:
    """One summary carried from turn to turn: counts, the best so far, and the last experiments that fit."""
    counts: dict[str, int] = {}
    for past in history:
        counts[past.decision] = counts.get(past.decision, 0) + 1
    best = min((p for p in history if p.metric is not None), key=lambda p: p.metric)
    head = (
        f"{len(history)} experiments ({counts}); best {best.metric:.4g} by #{best.number} {best.description}"
    )
    return head + "\n" + truncation(history, budget - count(head) - 1, count)


METHODS: dict[str, Method] = {
    "nightlab memory": memory,
    "last-N truncation": truncation,
    "rolling summary": rolling_summary,
}


def main() -> None:
    console, count = Console(), token_counter(None)
    history = synthetic_history()
    table = Table(title=f"recall of {len(facts(''))} planted facts from a 500-experiment history")
    table.add_column("method")
    for budget in (2000, 4000, 8000):
        table.add_column(f"{budget // 1000}k tokens", justify="right")
    recall: dict[tuple[str, int], float] = {}
    for name, method in METHODS.items():
        cells = []
        for budget in (2000, 4000, 8000):
            text = method(history, budget, count)
            assert count(text) <= budget, (name, budget, count(text))
            found = facts(text)
            recall[name, budget] = sum(found.values()) / len(found)
            cells.append(f"{recall[name, budget]:.0%} ({count(text)} tok)")
        table.add_row(name, *cells)
    console.print(table)
    growth = Table(title="tokens per turn at a 4k budget as the night goes on")
    growth.add_column("experiments", justify="right")
    for name in METHODS:
        growth.add_column(name, justify="right")
    for n in (50, 100, 200, 500):
        growth.add_row(str(n), *(str(count(m(history[:n], 4000, count))) for m in METHODS.values()))
    console.print(growth)
    ratio = recall["nightlab memory", 4000] / max(recall["last-N truncation", 4000], 1e-9)
    ours, theirs = recall["nightlab memory", 4000], recall["last-N truncation", 4000]
    console.print(
        f"at 4k: memory {ours:.0%} vs truncation {theirs:.0%} ({ratio:.1f}x); goal >= 90% vs <= 50%"
    )


if __name__ == "__main__":
    main()
