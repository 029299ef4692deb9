"""Proposers suggest the next change; the loop knows them only through `base.Proposer`.

Adding a proposer is adding a module to this package: `registered` imports every module here (names starting
with `_` are private helpers) and each one `@register`s its class. The modules import their heavy libraries
only when a proposer is built, so a run with the replay proposer never loads optuna or the openai client.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from nightlab.config import ConfigError, NightlabConfig
from nightlab.research.proposers.base import PluggableProposer, Proposer, registrations

AUTO = "auto"


def registered() -> dict[str, type[PluggableProposer]]:
    """Every proposer of this package by name, alphabetically; a module is imported once, on first use."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    return registrations()


def resolve_kind(config: NightlabConfig, kind_override: str | None = None) -> str:
    """The registered name of the proposer to use. `auto` means llm when a model is configured (nightlab.toml
    or NIGHTLAB_LLM_MODEL), else tune."""
    kind = kind_override or config.proposer.kind
    names = registered()
    if kind != AUTO and kind not in names:
        raise ConfigError(
            f"unknown proposer {kind!r} (--proposer or proposer.kind in nightlab.toml); choose one of "
            + ", ".join([AUTO, *names])
        )
    if kind == AUTO:
        from nightlab.research.proposers.llm import configured_model

        return "llm" if configured_model(config.proposer.section("llm")) else "tune"
    return kind


def check_run_options(config: NightlabConfig, kind_override: str | None, max_cost: float | None) -> None:
    """Refuse run options the chosen proposer cannot honour (--max-cost for an LLM without prices), before
    anything is created or run."""
    kind = resolve_kind(config, kind_override)
    registered()[kind].check_run_options(config.proposer.section(kind), max_cost)


def make_proposer(config: NightlabConfig, workspace: Path, kind_override: str | None = None) -> Proposer:
    """Build the proposer a run uses, from its own `[proposer.<name>]` section."""
    kind = resolve_kind(config, kind_override)
    return registered()[kind].from_config(config.proposer.section(kind), Path(workspace), config)
