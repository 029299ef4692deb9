"""Figures for the recipes: s1's test-time scaling curve, an RL run's per-step metrics, the online rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scaling(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy against thinking budget, one line per mode (rows: budget, mode, accuracy, thinking_tokens)."""
    fig, (acc_ax, len_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for mode in sorted({r["mode"] for r in rows}):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["budget"])
        budgets = [r["budget"] for r in mine]
        acc_ax.plot(budgets, [100 * r["accuracy"] for r in mine], marker="o", label=mode)
        len_ax.plot(budgets, [r["thinking_tokens"] for r in mine], marker="o", label=mode)
    acc_ax.set(xlabel="thinking budget (tokens)", ylabel="accuracy (%)", title="test-time scaling")
    len_ax.set(
        xlabel="thinking budget (tokens)", ylabel="mean thinking tokens", title="thinking actually used"
    )
    for ax in (acc_ax, len_ax):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


RL_PANELS = (
    ("reward_mean", "reward"),
    ("kl", "KL to base"),
    ("entropy", "entropy (nats/token)"),
    ("completion_len", "completion tokens"),
)


def plot_rl_metrics(rows: list[dict[str, Any]], path: Path) -> Path:
    """Reward, KL, entropy and completion length per step, one panel each (panels without data stay empty)."""
    fig, axes = plt.subplots(1, len(RL_PANELS), figsize=(4 * len(RL_PANELS), 3.4), dpi=120)
    for ax, (key, label) in zip(axes, RL_PANELS, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".")
        ax.set(xlabel="step", title=label)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_online(rows: list[dict[str, Any]], path: Path) -> Path:
    """The online loop per round: each candidate's held-out reward-model score and rubric score, the
    no-update baseline as a line, promoted rounds shaded."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [r["round"] for r in rows]
    ax.plot(rounds, [r["candidate"]["reward"] for r in rows], "o-", label="reward model score")
    ax.plot(rounds, [r["candidate"]["rubric"] for r in rows], "s--", label="rubric (fixed)")
    ax.axhline(rows[0]["candidate"]["reward"], color="grey", lw=0.8, label="no-update baseline")
    for r in rows[1:]:
        if r["promoted"]:
            ax.axvspan(r["round"] - 0.2, r["round"] + 0.2, color="green", alpha=0.15)
    ax.set_xlabel("round (shaded: promoted)")
    ax.set_ylabel("held-out score")
    ax.legend(loc="best")
    return _save(fig, path)


def plot_accuracy_vs_shots(rows: list[dict[str, Any]], path: Path, chance: float) -> Path:
    """Held-out accuracy against labelled images per class, one line per method, chance as a dashed line
    (rows: shots, method, accuracy)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in sorted({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["shots"])
        ax.plot([r["shots"] for r in mine], [100 * r["accuracy"] for r in mine], marker="o", label=method)
    ax.axhline(100 * chance, color="grey", ls="--", lw=0.8, label="chance")
    ax.set(xlabel="shots per class", ylabel="accuracy (%)", title="few-shot image classification")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
