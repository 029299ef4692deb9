"""`nightlab online status`: the online run's rounds as a table and a plot of reward and rubric per round."""

from __future__ import annotations

from typing import Any

from rich.table import Table

PLOT_FILE = "online.png"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def status_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="online rounds (round 0: the base model, no update)")
    for column in ("round", "feedback", "agreement", "reward", "served reward", "rubric", "KL", "served?"):
        table.add_column(column, justify="right")
    table.add_column("why")
    for r in rows:
        cand, served = r["candidate"], r.get("served") or {}
        promoted = "" if r["round"] == 0 else ("promoted" if r["promoted"] else "kept, not served")
        table.add_row(
            str(r["round"]),
            str(r.get("events", "")),
            _num(r.get("agreement")),
            _num(cand["reward"]),
            _num(served.get("reward")),
            _num(cand["rubric"]),
            _num(cand["kl"]),
            promoted,
            r.get("reason", ""),
        )
    return table


def summary(rows: list[dict[str, Any]]) -> str:
    """Feedback volume, promotions, refusals, and the held-out reward of the baseline and of the served."""
    rounds = [r for r in rows if r["round"] > 0]
    promoted = [r for r in rounds if r["promoted"]]
    baseline = rows[0]["candidate"]["reward"]
    served = promoted[-1]["candidate"]["reward"] if promoted else baseline
    events = sum(r["events"] for r in rounds)
    return (
        f"{len(rounds)} rounds, {events} feedback events, {len(promoted)} promoted, "
        f"{len(rounds) - len(promoted)} kept unserved; held-out reward {baseline:.3f} (no update) -> "
        f"{served:.3f} (served)"
    )
