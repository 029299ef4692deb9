"""progress.png: every experiment a point, kept ones highlighted, the running best as a step line."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from nightlab.research.journal import Experiment


def plot_progress(
    experiments: Sequence[Experiment], metric_name: str, goal: str, path: Path, noise: float | None = None
) -> Path:
    """Draw the run's progress from its journal records (baselines included) and save it as a PNG."""
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    measured = [e for e in experiments if e.metric is not None]
    others = [e for e in measured if e.decision != "keep"]
    kept = [e for e in measured if e.decision == "keep"]
    ax.scatter(
        [e.number for e in others],
        [e.metric for e in others],
        s=18,
        color="#9a9a9a",
        label="discarded",
        zorder=2,
    )
    ax.scatter(
        [e.number for e in kept],
        [e.metric for e in kept],
        s=40,
        color="#1a9641",
        edgecolor="black",
        linewidth=0.5,
        label="kept",
        zorder=3,
    )
    failed = [e for e in experiments if e.metric is None]
    if failed and measured:
        top = max(e.metric for e in measured) if goal == "minimize" else min(e.metric for e in measured)
        ax.scatter(
            [e.number for e in failed],
            [top] * len(failed),
            marker="x",
            color="#d7191c",
            label="crash / invalid / timeout / overrun",
            zorder=2,
        )
    base = [e.metric for e in kept if e.kind == "baseline"]
    if base:
        xs, ys, best = [], [], statistics.fmean(base)
        for e in experiments:
            if e.kind == "candidate" and e.decision == "keep":
                best = e.metric
            xs.append(e.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="#1a9641", linewidth=1.5, label="best so far", zorder=1)
        if noise:
            ax.fill_between(
                xs,
                [y - noise for y in ys],
                [y + noise for y in ys],
                step="post",
                color="#1a9641",
                alpha=0.12,
                linewidth=0,
                label="± noise floor",
            )
    ax.set_xlabel("experiment")
    ax.set_ylabel(f"{metric_name} ({'lower' if goal == 'minimize' else 'higher'} is better)")
    keeps = sum(e.kind == "candidate" and e.decision == "keep" for e in experiments)
    ax.set_title(f"nightlab: {len(experiments)} runs, {keeps} kept")
    return _finish(fig, ax, path)


def plot_curves(experiments: Sequence[Experiment], progress_name: str, path: Path) -> Path | None:
    """curves.png: the training progress of every run that printed some (`metric.progress`), against the
    fraction of the budget spent: kept runs green, aborted ones red, the rest grey. None when no run has a
    curve."""
    with_curves = [e for e in experiments if e.curve]
    if not with_curves:
        return None
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    styles = {
        "keep": {"color": "#1a9641", "linewidth": 1.6, "zorder": 3},
        "aborted": {"color": "#d7191c", "linewidth": 1.2, "linestyle": "--", "zorder": 2},
    }
    labelled: set[str] = set()
    for e in with_curves:
        kind = e.decision if e.decision in styles else "other"
        style = styles.get(kind, {"color": "#9a9a9a", "linewidth": 0.8, "zorder": 1})
        label = {"keep": "kept", "aborted": "aborted"}.get(kind, "not kept") if kind not in labelled else None
        labelled.add(kind)
        ax.plot([f for f, _ in e.curve], [v for _, v in e.curve], label=label, **style)
    ax.set_xlabel("fraction of the training budget")
    ax.set_ylabel(progress_name)
    ax.set_title(f"nightlab: training progress of {len(with_curves)} runs")
    return _finish(fig, ax, path)


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path) -> Path:
    """Grid, legend and layout as every nightlab figure has them; saved to `path` and closed."""
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
