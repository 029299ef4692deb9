"""A run as one JSON document, for agents and scripts: `nightlab status --json` and `nightlab report --json`.

An outside agent that drives nightlab by hand needs what the loop's own proposers see (the history, the
best, the noise, the streak without a keep) without parsing tables meant for people. The document is
derived from the journal, like every other view, and says which schema it follows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from nightlab.config import NightlabConfig
from nightlab.research.journal import Experiment, Journal
from nightlab.research.report import find_run
from nightlab.research.state import LoopState, from_journal, plateaus

SCHEMA = "nightlab.run/1"
# Columns a reader can do without: the proposal as sent (the committed `diff` says what changed) and the
# JSON duplicates of parsed fields.
_LEFT_OUT = ("patch", "run_id")


def _experiment(r: Experiment) -> dict[str, Any]:
    row = asdict(r)
    for key in _LEFT_OUT:
        row.pop(key, None)
    return row


def run_document(journal: Journal, tag: str | None = None) -> dict[str, Any]:
    """The run `tag` (default: the latest) of a verified journal as plain data."""
    journal.verify_chain()
    run = find_run(journal, tag)
    records = journal.experiments(run.id)
    config = NightlabConfig.model_validate(run.config)
    state = from_journal(
        LoopState(metric_name=run.metric_name, goal=run.goal), records, run.base_commit, config.experiment
    )
    candidates = [r for r in records if r.kind == "candidate"]
    after = config.proposer.plateau_after
    return {
        "schema": SCHEMA,
        "run": {
            "tag": run.tag,
            "branch": run.branch,
            "base_commit": run.base_commit,
            "workspace": config.workspace.name,
            "metric": run.metric_name,
            "goal": run.goal,
            "budget_seconds": config.experiment.budget_seconds,
        },
        "baseline": {"metric": state.baseline, "runs": state.baseline_runs},
        "best": {
            "metric": state.best,
            "runs": state.best_runs,
            "commit": state.best_commit,
            "latest": state.best_latest,
        },
        "noise": state.noise,
        "counts": {
            "experiments": state.experiments,
            "kept": state.keeps,
            "decisions": state.decisions,
            "since_last_keep": state.since_keep,
            "cost_usd": state.cost_usd,
        },
        "plateau": {
            "after": after,
            "on_plateau": config.proposer.on_plateau,
            "now": bool(after) and state.since_keep >= after,
            "spans": [list(span) for span in plateaus(candidates, after)],
        },
        "experiments": [_experiment(r) for r in records],
        "running": [_experiment(p.experiment) for p in journal.pending(run.id)],
        "heldout": [asdict(h) for h in journal.heldout(run.id)],
    }


def _plain(value: Any) -> Any:
    """`value` with every float JSON cannot hold (NaN, infinities) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_json(journal: Journal, tag: str | None = None) -> str:
    """`run_document` as strict JSON text."""
    return json.dumps(_plain(run_document(journal, tag)), indent=2, allow_nan=False)
