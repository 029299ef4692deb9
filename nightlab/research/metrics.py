"""The metric channel: turn a phase's output into numbers the loop can trust.

Two channels exist. `log` parses `name: value` lines from the run log (simple, but editable code can print
anything). `harness` accepts only lines signed with a key that the loop hands to the evaluate step alone, so a
number printed by the code under test is logged and otherwise ignored. Harnesses sign with
`nightlab.harness.sign_metrics`; this module reads and verifies.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from dataclasses import dataclass, field

from nightlab.config import MetricSection
from nightlab.errors import NightlabError
from nightlab.harness import SIGNED_PREFIX, signature

_SIGNED_LINE = re.compile(rf"^{SIGNED_PREFIX} (\{{.*\}}) ([0-9a-f]{{64}})\s*$")
_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity))"


class MetricError(NightlabError, ValueError):
    """The output holds no usable metric; the message says what was missing or wrong."""


@dataclass
class Measurement:
    """The deciding metric of one run plus whatever extra numbers were found."""

    value: float
    extra: dict[str, float] = field(default_factory=dict)


def read_signed_metrics(text: str, key: str) -> dict[str, float]:
    """Metrics of the last correctly signed line in `text`; raise MetricError when there is none.

    Lines that look like records but carry a wrong signature are counted in the error, since they suggest
    something other than the harness tried to speak on its channel.
    """
    found: dict[str, float] | None = None
    forged = 0
    for line in text.splitlines():
        m = _SIGNED_LINE.match(line.strip())
        if not m:
            forged += line.startswith(SIGNED_PREFIX)
            continue
        payload, sig = m.groups()
        if not hmac.compare_digest(sig, signature(payload, key)):
            forged += 1
            continue
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            forged += 1
            continue
        if not isinstance(data, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in data.values()
        ):
            raise MetricError(f"signed metric record is not a mapping of names to numbers: {payload[:200]}")
        found = {str(k): float(v) for k, v in data.items()}
    if found is None:
        hint = f" ({forged} line(s) with a bad signature were ignored)" if forged else ""
        raise MetricError(f"no signed {SIGNED_PREFIX} line in the evaluate output{hint}")
    return found


def parse_log_metrics(text: str, names: list[str], pattern: str | None = None) -> dict[str, float]:
    """`name: value` lines (or `pattern`'s first group for names[0]); the last match of each name wins.

    A value that is present but not a number raises MetricError, so garbage never reads as "missing".
    """
    found: dict[str, float] = {}
    for i, name in enumerate(names):
        regex = (
            re.compile(pattern, re.MULTILINE)
            if (pattern and i == 0)
            else re.compile(rf"^\s*{re.escape(name)}\s*[:=]\s*(\S+)\s*$", re.MULTILINE)
        )
        matches = regex.findall(text)
        if not matches:
            continue
        raw = matches[-1] if isinstance(matches[-1], str) else matches[-1][0]
        if not re.fullmatch(_NUMBER, raw.strip(), re.IGNORECASE):
            raise MetricError(f"{name}: {raw.strip()[:80]!r} is not a number")
        found[name] = float(raw)
    return found


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise MetricError(f"{name} is {value} (not finite)")
    return value


def measure(
    section: MetricSection, *, train_log: str, evaluate_log: str | None, key: str | None
) -> Measurement:
    """Read the deciding metric (and extras) from a run's output through the configured channel."""
    name = section.name
    if section.channel == "harness":
        if evaluate_log is None or key is None:
            raise MetricError("metric.channel = 'harness' needs experiment.evaluate to be set")
        signed = read_signed_metrics(evaluate_log, key)
        if name not in signed:
            raise MetricError(
                f"signed record has no {name!r} (it has: {', '.join(sorted(signed)) or 'nothing'})"
            )
        value = signed[name]
        extra = {k: signed[k] for k in section.extra if k in signed}
        missing = [k for k in section.extra if k not in extra]
        extra.update(_lenient_extras(train_log + "\n" + (evaluate_log or ""), missing))
    else:
        text = train_log + "\n" + (evaluate_log or "")
        found = parse_log_metrics(text, [name], section.pattern)
        if name not in found:
            raise MetricError(f"no `{name}: <number>` line in the output")
        value = found[name]
        extra = _lenient_extras(text, section.extra)
    return Measurement(_finite(name, value), {k: v for k, v in extra.items() if math.isfinite(v)})


def _lenient_extras(text: str, names: list[str]) -> dict[str, float]:
    """Extras are informational: a malformed one is skipped rather than failing the experiment."""
    out: dict[str, float] = {}
    for n in names:
        try:
            out.update(parse_log_metrics(text, [n]))
        except MetricError:
            continue
    return out
