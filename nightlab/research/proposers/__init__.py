"""Proposers suggest the next change; the loop knows them only through `base.Proposer`.

`make_proposer` picks one from the config (or a --proposer override) and imports it lazily, so a run with
the replay proposer never loads optuna or the openai client.
"""

from __future__ import annotations

import os
from pathlib import Path

from nightlab.config import ConfigError, NightlabConfig
from nightlab.research.proposers.base import Proposer

KINDS = ("auto", "llm", "tune", "replay")


def resolve_kind(config: NightlabConfig, kind_override: str | None = None) -> str:
    """`auto` means llm when a model is configured (nightlab.toml or NIGHTLAB_LLM_MODEL), else tune."""
    kind = kind_override or config.proposer.kind
    if kind not in KINDS:
        raise ConfigError(
            f"unknown proposer {kind!r} (--proposer or proposer.kind in nightlab.toml); choose one of {', '.join(KINDS)}"
        )
    if kind == "auto":
        return "llm" if (config.proposer.llm.model or os.environ.get("NIGHTLAB_LLM_MODEL")) else "tune"
    return kind


def make_proposer(config: NightlabConfig, workspace: Path, kind_override: str | None = None) -> Proposer:
    """Build the proposer a run uses."""
    kind = resolve_kind(config, kind_override)
    workspace = Path(workspace)
    if kind == "replay":
        from nightlab.research.proposers.replay import ReplayProposer

        return ReplayProposer(workspace / Path(config.proposer.replay.patches).expanduser())
    if kind == "llm":
        from nightlab.research.proposers.llm import LLMProposer

        return LLMProposer(config.proposer.llm)
    from nightlab.research.proposers.tune import TuneProposer

    return TuneProposer(config.proposer.tune, workspace, config.metric.goal)
