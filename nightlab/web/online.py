"""The dashboard's page of an online run (`nightlab online`): its rounds as a table and a plot drawn on the
server, read from the run's `online.jsonl` (`nightlab dashboard --online DIR`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

from nightlab.errors import NightlabError
from nightlab.recipes.online.journal import JOURNAL, read_rounds
from nightlab.web.svg import HEIGHT, PAD, WIDTH, Scale


def online_svg(rows: list[dict[str, Any]]) -> Markup:
    """Each round's reward-model and rubric scores as lines, the no-update baseline flat, promoted rounds'
    points larger and green; every point's tooltip says what happened."""
    values = [r["candidate"][k] for r in rows for k in ("reward", "rubric")]
    pad = (max(values) - min(values)) * 0.08 or 0.05
    scale = Scale(0, max(len(rows) - 1, 1), min(values) - pad, max(values) + pad)
    parts = [
        f'<svg class="progress online" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="online rounds">'
    ]
    parts.append(
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"/>'
    )
    for value in (scale.y0 + pad, scale.y1 - pad):
        parts.append(f'<text class="tick" x="4" y="{scale.y(value):.1f}">{value:.3g}</text>')
    legend = "blue: reward-model score; dashed: rubric (fixed); grey: no-update baseline"
    parts.append(f'<text class="tick" x="{PAD}" y="16">{legend}</text>')
    base = scale.y(rows[0]["candidate"]["reward"])
    parts.append(f'<line class="baseline" x1="{PAD}" y1="{base:.1f}" x2="{WIDTH - PAD}" y2="{base:.1f}">')
    parts.append("<title>no-update baseline</title></line>")
    for key in ("reward", "rubric"):
        points = " ".join(f"{scale.x(r['round']):.1f},{scale.y(r['candidate'][key]):.1f}" for r in rows)
        parts.append(f'<polyline class="{key}" points="{points}"><title>{key}</title></polyline>')
    for r in rows:
        promoted = bool(r.get("promoted"))
        what = "no-update baseline" if r["round"] == 0 else ("promoted" if promoted else "kept, not served")
        tip = escape(
            f"round {r['round']}: reward {r['candidate']['reward']:.3f}, {what}. {r.get('reason', '')}"
        )
        parts.append(
            f'<circle class="point {"kept" if promoted else "other"}" data-round="{r["round"]}" '
            f'cx="{scale.x(r["round"]):.1f}" cy="{scale.y(r["candidate"]["reward"]):.1f}" '
            f'r="{6 if promoted else 4}"><title>{tip}</title></circle>'
        )
    parts.append(f'<text class="tick" x="{WIDTH / 2:.0f}" y="{HEIGHT - 12}">round</text></svg>')
    return Markup("".join(parts))


def online_page(log_dir: Path) -> dict[str, Any]:
    rows = read_rounds(log_dir)
    if not rows:
        raise NightlabError(f"{Path(log_dir) / JOURNAL} has no round yet")
    promoted = [r for r in rows[1:] if r.get("promoted")]
    return {
        "log_dir": str(log_dir),
        "rounds": rows,
        "plot": online_svg(rows),
        "feedback": sum(r.get("events", 0) for r in rows),
        "promotions": len(promoted),
        "baseline": rows[0]["candidate"]["reward"],
        "served": promoted[-1]["candidate"]["reward"] if promoted else rows[0]["candidate"]["reward"],
    }
