"""The agent's memory of a run under a fixed token budget, however long the night ("memory diffusion").

A proposer's context cannot hold 500 experiments with their diffs, and the last N of them forget the dead
ends tried early, the path that led to the best and why things crashed. Each turn the history is
re-rendered in three steps:

- **mask**: every experiment gets a place by what it teaches: the kept changes (the path to the best), the
  near misses (discarded within reach of the bar), crashes grouped by their cause, ideas tried again and
  again (grouped by the names their diffs assign), the best results, and the most recent ones;
- **allocate**: the budget goes to those places in that order, each item first as one line; what is left
  buys full diffs for the most telling items (the best's change, the closest near miss, the last experiment);
  what does not fit is dropped, and counted;
- **refill**: the text is rendered and counted with a real tokenizer (`TokenCounter`), never over budget;
  with `notes` (a `LessonWriter`, `memory_notes = "llm"`), the counted groups first get an LLM's one-line
  lesson where it fits.

The compression is deterministic: the same history and budget (and, with notes, the same cached lessons) give
the same text.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nightlab.research.proposers.base import PastExperiment

if TYPE_CHECKING:
    from nightlab.research.memory_notes import LessonWriter

TokenCounter = Callable[[str], int]
_TOKENIZER_FILE = "tokenizer.json"
NEAR_MISS_SIGMAS = 1.0  # a discard this many noise units better than the best is worth remembering
RECENT = 5
LESSON_EVIDENCE = 10  # a lesson is asked from the group's line and its latest experiments, this many
# `NAME = ...`, `NAME += ...` or `NAME: type = ...` on a changed line of a diff (not `==`).
_ASSIGNED = re.compile(r"^[+-]\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(?::[^=\n]*)?[+\-*/]?=(?!=)", re.M)
_VOLATILE = re.compile(r"0x[0-9a-f]+|\d+(\.\d+)?|/[^\s:]+")


def topic(past: PastExperiment) -> str:
    """The idea an experiment tried, as the names its change assigns (or its knobs): what repeats of an idea
    share however they are worded."""
    names = sorted(set(_ASSIGNED.findall(past.patch)) | set(past.params))
    return ", ".join(names[:3]) if names else ""


def last_words(reason: str) -> str:
    """The line of a failure's reason that says what went wrong: its last."""
    lines = [text.strip() for text in reason.strip().splitlines() if text.strip()]
    return lines[-1][:160] if lines else "no reason recorded"


def failure_cause(reason: str) -> str:
    """A failure's cause without what varies between occurrences (numbers, addresses, paths)."""
    return _VOLATILE.sub("N", last_words(reason))


def _value(past: PastExperiment) -> str:
    return "no metric" if past.metric is None or not math.isfinite(past.metric) else f"{past.metric:.6g}"


def line(past: PastExperiment) -> str:
    """One experiment in one line: number, decision, value, margin, what, why."""
    sigmas = f", {past.sigmas:+.1f} noise" if past.sigmas is not None else ""
    reason = f" - {past.reason.splitlines()[0][:160]}" if past.reason else ""
    return f"- #{past.number} {past.decision} {_value(past)}{sigmas}: {past.description}{reason}"


def full(past: PastExperiment) -> str:
    """An experiment with its diff."""
    return f"{line(past)}\n```diff\n{past.patch.strip()[:4000]}\n```"


@dataclass
class _Group:
    """What a counted line stands for: a key that stays as the group grows, and its experiments."""

    key: str
    members: list[PastExperiment]


Item = PastExperiment | _Group  # what an entry shows: one experiment, or a counted group of them


@dataclass
class _Section:
    title: str
    entries: list[tuple[str, Item]] = field(default_factory=list)  # text, what it shows
    expandable: bool = False  # whether leftover budget buys its experiments' diffs


def _sections(history: Sequence[PastExperiment], goal: str) -> list[_Section]:
    """Mask: the places in the memory, most important first, each with its entries in order."""
    sign = 1 if goal == "minimize" else -1
    kept = [p for p in history if p.decision == "keep"]
    path = _Section("Path to the best (every kept change, in order)", [(line(p), p) for p in kept], True)
    misses = sorted(
        (p for p in history if p.decision == "discard" and (p.sigmas or 0) >= NEAR_MISS_SIGMAS),
        key=lambda p: -(p.sigmas or 0),
    )
    near = _Section(
        "Near misses (better than the best, not by enough to keep)", [(line(p), p) for p in misses], True
    )
    crashes: dict[str, list[PastExperiment]] = defaultdict(list)
    for p in history:
        if p.decision in ("crash", "timeout", "overrun", "invalid"):
            crashes[failure_cause(p.reason)].append(p)
    failures = _Section(
        "Failures, by cause",
        [
            (_failure_line(ps), _Group(f"failure: {cause}", ps))
            for cause, ps in sorted(crashes.items(), key=lambda kv: len(kv[1]), reverse=True)
        ],
    )
    ideas: dict[str, list[PastExperiment]] = defaultdict(list)
    for p in history:
        if key := topic(p):
            ideas[key].append(p)
    repeated = _Section(
        "Ideas tried more than once",
        [
            (_idea_line(key, ps, sign), _Group(f"idea: {key}", ps))
            for key, ps in sorted(ideas.items(), key=lambda kv: -len(kv[1]))
            if len(ps) > 1
        ],
    )
    measured = sorted(
        (p for p in history if p.metric is not None and math.isfinite(p.metric)),
        key=lambda p: sign * p.metric,
    )
    best = _Section("Best results", [(line(p), p) for p in measured[:10]])
    recent = _Section("Most recent", [(line(p), p) for p in history[-RECENT:]], True)
    return [path, near, failures, repeated, best, recent]


def _failure_line(failures: list[PastExperiment]) -> str:
    numbers = ", #".join(str(p.number) for p in failures[:6])
    first = failures[0]
    return f"- {len(failures)} x {first.decision}: {last_words(first.reason)} (#{numbers})"


def _idea_line(key: str, tries: list[PastExperiment], sign: int) -> str:
    decisions = defaultdict(int)
    for p in tries:
        decisions[p.decision] += 1
    outcome = ", ".join(f"{n} {d}" for d, n in sorted(decisions.items(), key=lambda kv: -kv[1]))
    measured = [p for p in tries if p.metric is not None and math.isfinite(p.metric)]
    best = min(measured, key=lambda p: sign * p.metric, default=None)
    best_text = f"; best {_value(best)} (#{best.number})" if best else ""
    numbers = ", #".join(str(p.number) for p in tries[:8])
    return f"- {len(tries)} changes to {key}: {outcome}{best_text} (#{numbers})"


def render_memory(
    history: Sequence[PastExperiment],
    goal: str,
    metric_name: str,
    budget: int,
    count: TokenCounter,
    notes: LessonWriter | None = None,
) -> str:
    """The run's history as text of at most `budget` tokens by `count` (allocate and refill), the groups
    with their lessons from `notes` where given and where they fit."""
    if not history:
        return "None yet besides the baseline."
    sign = 1 if goal == "minimize" else -1
    measured = [p for p in history if p.metric is not None and math.isfinite(p.metric)]
    best = min(measured, key=lambda p: sign * p.metric, default=None)
    head = f"{len(history)} experiments"
    if best is not None:
        head += f"; best {metric_name} {_value(best)} (#{best.number}: {best.description})"
    chosen: list[tuple[_Section, str, Item]] = []
    used, shown = count(head) + 1, set()
    for section in _sections(history, goal):
        title_cost = count(f"## {section.title}") + 2
        for text, item in section.entries:
            if isinstance(item, PastExperiment) and item.number in shown:
                continue
            cost = count(text) + 1 + (0 if any(s is section for s, _, _ in chosen) else title_cost)
            if used + cost > budget:
                continue
            chosen.append((section, text, item))
            used += cost
            if isinstance(item, PastExperiment):
                shown.add(item.number)
    if notes is not None:
        used = _add_lessons(chosen, used, budget, count, notes, f"Goal: {goal} `{metric_name}`.")
    for index, (section, text, item) in enumerate(chosen):  # refill: diffs for the most telling, in order
        if not isinstance(item, PastExperiment) or not item.patch or not section.expandable:
            continue
        richer = full(item)
        extra = count(richer) - count(text)
        if used + extra <= budget:
            chosen[index] = (section, richer, item)
            used += extra
    return _assemble(head, chosen, len(history) - len(shown), budget, count)


def _add_lessons(
    chosen: list[tuple[_Section, str, Item]],
    used: int,
    budget: int,
    count: TokenCounter,
    notes: LessonWriter,
    goal: str,
) -> int:
    """Refill: each chosen group's line with its lesson appended where the budget has room for it (asked
    only where some lesson could fit); the tokens used after."""
    notes.start()
    for index, (section, text, item) in enumerate(chosen):
        if not isinstance(item, _Group) or used + count(_with_lesson(text, "x")) - count(text) > budget:
            continue
        evidence = "\n".join([goal, f"The group:\n{text}", "Its latest experiments:"])
        evidence += "".join(f"\n{_tried(p)}" for p in item.members[-LESSON_EVIDENCE:])
        lesson = notes.lesson(_lesson_key(item), len(item.members), evidence)
        richer = _with_lesson(text, lesson) if lesson else text
        extra = count(richer) - count(text)
        if extra and used + extra <= budget:
            chosen[index] = (section, richer, item)
            used += extra
    return used


def _lesson_key(group: _Group) -> str:
    """The group's key and its first experiment's change: the same while the group grows, another for the
    same idea in another run of the workspace, whose lessons share the cache."""
    first = group.members[0]
    change = hashlib.sha256(f"{first.description}\n{first.patch}\n{sorted(first.params.items())}".encode())
    return f"{group.key} @{change.hexdigest()[:12]}"


def _tried(past: PastExperiment) -> str:
    """One experiment of a group as a lesson needs it: the values it set and how that went, with the cause."""
    changes = [text.strip() for text in past.patch.splitlines() if _ASSIGNED.match(text)][:4]
    knobs = [f"{name} = {value:g}" for name, value in sorted(past.params.items())]
    what = "; ".join([past.description[:160], *(text[:120] for text in changes + knobs)])
    reason = f" - {last_words(past.reason)}" if past.reason else ""
    return f"- #{past.number} {past.decision} {_value(past)}: {what}{reason}"


def _with_lesson(text: str, lesson: str) -> str:
    return f"{text} — lesson: {lesson}"


def _assemble(
    head: str,
    chosen: list[tuple[_Section, str, Item]],
    unlisted: int,
    budget: int,
    count: TokenCounter,
) -> str:
    """The text in section order; trimmed from the end in the rare case joins cost more than counted."""
    lines = [head]
    current = None
    for section, text, _ in chosen:
        if section is not current:
            lines += ["", f"## {section.title}"]
            current = section
        lines.append(text)
    if unlisted:
        lines += ["", f"({unlisted} experiments are not listed one by one; the groups above count them)"]
    text = "\n".join(lines)
    while count(text) > budget and len(lines) > 1:
        lines.pop()
        text = "\n".join(lines)
    return text


def token_counter(model: str | None = None) -> TokenCounter:
    """Tokens as the LLM counts them: its own tokenizer where `model` is a local directory holding one, else
    SmolLM2's, which nightlab has offline; a byte-based estimate (3 bytes a token) only where neither is."""
    from tokenizers import Tokenizer

    path = Path(model).expanduser() / _TOKENIZER_FILE if model else None
    if path is None or not path.is_file():
        path = _offline_tokenizer()
    if path is None:
        return lambda text: len(text.encode()) // 3 + 1
    tokenizer = Tokenizer.from_file(str(path))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def _offline_tokenizer() -> Path | None:
    """SmolLM2's tokenizer file, written once from the offline model into nightlab's data dir."""
    from nightlab.train import models
    from nightlab.train.settings import default_data_dir

    data_dir = default_data_dir()
    try:
        resolved = models.resolve("smollm2", data_dir)
    except (models.UnknownModelError, OSError, ValueError):
        return None
    if resolved.source == "gguf":
        return models.gguf_tokenizer_dir(resolved, data_dir) / _TOKENIZER_FILE
    candidate = resolved.path / _TOKENIZER_FILE
    return candidate if candidate.is_file() else None
