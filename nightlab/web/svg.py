"""The progress plot as an SVG drawn on the server: no script library, no network, and every point a link.

Each measured experiment is a circle (kept ones green and larger) whose tooltip gives its number, decision,
value and description and which opens the experiment's page; the running best is a step line with the noise
floor as a band around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from nightlab.research.journal import Experiment

WIDTH, HEIGHT, PAD = 900, 320, 48


@dataclass(frozen=True)
class Scale:
    """Maps experiment numbers and metric values into the plot's pixels."""

    x0: float
    x1: float
    y0: float
    y1: float

    def x(self, number: float) -> float:
        return PAD + (number - self.x0) / max(self.x1 - self.x0, 1) * (WIDTH - 2 * PAD)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return HEIGHT - PAD - (value - self.y0) / span * (HEIGHT - 2 * PAD)


def _best_line(records: Sequence[Experiment]) -> list[tuple[int, float]]:
    base = [
        r.metric for r in records if r.kind == "baseline" and r.decision == "keep" and r.metric is not None
    ]
    if not base:
        return []
    best, line = sum(base) / len(base), []
    for r in records:
        if r.kind == "candidate" and r.decision == "keep" and r.metric is not None:
            best = r.metric
        line.append((r.number, best))
    return line


def progress_svg(records: Sequence[Experiment], tag: str, noise: float | None) -> Markup:
    """The run's progress plot; an empty plot says so."""
    points = [r for r in records if r.metric is not None]
    if not points:
        return Markup('<p class="empty">No measured experiment yet.</p>')
    values = [r.metric for r in points]
    pad = (max(values) - min(values)) * 0.08 or abs(values[0]) * 0.05 or 1.0
    scale = Scale(
        min(r.number for r in records), max(r.number for r in records), min(values) - pad, max(values) + pad
    )
    parts = [f'<svg class="progress" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="progress plot">']
    parts.append(
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"/>'
    )
    for value in (scale.y0 + pad, scale.y1 - pad):
        parts.append(f'<text class="tick" x="4" y="{scale.y(value):.1f}">{value:.4g}</text>')
    line = _best_line(records)
    if line:
        # The best holds until the next keep: a step at each experiment, for the line and the band alike.
        steps = [line[0]] + [
            p for (_, v), (n, w) in zip(line, line[1:], strict=False) for p in ((n, v), (n, w))
        ]
        path = " ".join(
            f"{'M' if i == 0 else 'L'}{scale.x(n):.1f},{scale.y(v):.1f}" for i, (n, v) in enumerate(steps)
        )
        if noise:
            top = " ".join(f"{scale.x(n):.1f},{scale.y(v + noise):.1f}" for n, v in steps)
            bottom = " ".join(f"{scale.x(n):.1f},{scale.y(v - noise):.1f}" for n, v in reversed(steps))
            parts.append(
                f'<polygon class="noise" points="{top} {bottom}"><title>± noise floor</title></polygon>'
            )
        parts.append(f'<path class="best" d="{path}"><title>best so far</title></path>')
    parts.append(f'<text class="tick" x="{WIDTH / 2:.0f}" y="{HEIGHT - 12}">experiment</text>')
    for r in points:
        kept = r.decision == "keep"
        what = "baseline" if r.kind == "baseline" else r.description
        tip = escape(f"#{r.number} {r.decision} {r.metric:.6g}: {what}")
        parts.append(
            f'<a href="/runs/{escape(tag)}/experiments/{r.number}">'
            f'<circle class="point {"kept" if kept else "other"}" data-number="{r.number}" '
            f'cx="{scale.x(r.number):.1f}" cy="{scale.y(r.metric):.1f}" r="{6 if kept else 4}">'
            f"<title>{tip}</title></circle></a>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
