"""The Proposer protocol, the only thing the loop knows about whatever suggests the next change, and the
registry that lets `kind` in nightlab.toml (or `--proposer`) name one.

A proposer `kind` can name subclasses `PluggableProposer` and is decorated with `@register`: it declares its
own `[proposer.<name>]` section, how it is built from that section, and which run options it cannot honour.
The package finds the modules that register proposers by itself (`registered` in __init__.py).
"""

from __future__ import annotations

import re
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from nightlab.errors import NightlabError

if TYPE_CHECKING:
    from nightlab.config import NightlabConfig

PatchFormat = Literal["search_replace", "unified_diff"]
Decision = Literal[
    "keep",
    "discard",
    "crash",
    "timeout",
    "invalid",
    "overrun",
    "quarantine",
    "duplicate",
    "aborted",
    "stale",
]


@dataclass
class Usage:
    """LLM tokens and money spent on one proposal (zero for non-LLM proposers)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class Proposal:
    """One suggested change, expressed as a patch against the current best commit."""

    description: str
    patch: str
    patch_format: PatchFormat = "search_replace"
    rationale: str = ""
    usage: Usage = field(default_factory=Usage)
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class PastExperiment:
    """What the proposer may learn from an earlier experiment of this run."""

    number: int
    description: str
    decision: Decision
    metric: float | None
    reason: str = ""
    patch: str = ""
    params: dict[str, float] = field(default_factory=dict)
    sigmas: float | None = None  # its margin over the best, in noise units, where it was judged


@dataclass
class ProposalContext:
    """Everything a proposer sees: the human's instructions, the editable files, and the history."""

    program: str
    files: dict[str, str]
    metric_name: str
    goal: Literal["minimize", "maximize"]
    best_metric: float | None
    noise: float | None
    history: list[PastExperiment]
    last_invalid_reason: str | None = None
    plateau: int = 0  # on a plateau, the candidates in a row that kept nothing; else 0
    log_path: Path | None = None  # the log of the experiment this proposal becomes, for a proposer's own
    elsewhere: list[str] = field(default_factory=list)  # best results of other machines on this workspace
    running: list[str] = field(default_factory=list)  # candidates running now (--workers), by description


def running_note(context: ProposalContext) -> str:
    """The candidates running now on other workers, as a brief's section body; "" when none."""
    if not context.running:
        return ""
    ideas = "\n".join(f"- {what}" for what in context.running)
    return f"{ideas}\nTheir results are not in yet: propose something else, not one of these again."


@dataclass
class Outcome:
    """What happened to a proposal, handed back so the proposer can learn (e.g. Optuna's tell)."""

    decision: Decision
    metric: float | None
    reason: str = ""


class ProposerUnavailable(NightlabError, RuntimeError):
    """The service behind a proposer is down even after its own retries; the loop waits and asks again."""


@runtime_checkable
class Proposer(Protocol):
    """Suggests changes one at a time; returns None when it has nothing more to offer."""

    name: str

    def propose(self, context: ProposalContext) -> Proposal | None:
        """The next change, or None when there is nothing more to try; ProposerUnavailable in an outage."""
        ...

    def feedback(self, proposal: Proposal, outcome: Outcome) -> None: ...


class ProposerSettings(BaseModel):
    """A proposer's own table of nightlab.toml, `[proposer.<name>]`; an unknown key is an error naming it.

    Every key has a default: the table of a proposer that is not used may well be missing.
    """

    model_config = ConfigDict(extra="forbid")


class PluggableProposer(Proposer):
    """A proposer `kind` can name: set `name` and `settings`, implement `from_config`, and `@register` it.

    Every module of the proposers package is imported to find the registered names, so a proposer imports
    its heavy libraries when it is built, not at the top of its module: a run with another proposer should
    not pay for them.
    """

    settings: ClassVar[type[ProposerSettings]] = ProposerSettings

    @classmethod
    @abstractmethod
    def from_config(cls, settings: ProposerSettings, workspace: Path, config: NightlabConfig) -> Proposer:
        """The proposer a run uses, from its own section (an instance of `cls.settings`), the workspace root
        and the rest of the config."""

    @classmethod
    def check_run_options(cls, settings: ProposerSettings, max_cost: float | None) -> None:
        """Refuse run options this proposer cannot honour, before anything is created or run (raise
        ConfigError saying which key to set); by default every option works."""


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_REGISTRY: dict[str, type[PluggableProposer]] = {}
T = TypeVar("T", bound=PluggableProposer)


def register(cls: type[T]) -> type[T]:
    """Make `cls` selectable as `kind = "<cls.name>"`; its module only has to be in the proposers package."""
    if not _NAME.match(cls.name) or cls.name == "auto":
        raise ValueError(
            f"{cls.__qualname__}: proposer name {cls.name!r} must be a lower-case identifier, not auto"
        )
    if cls.__abstractmethods__:
        raise TypeError(f"{cls.__qualname__} must implement {', '.join(sorted(cls.__abstractmethods__))}")
    try:
        cls.settings()
    except ValidationError as exc:
        # Every run loads every registered proposer's table, most of them absent from nightlab.toml.
        keys = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        raise TypeError(
            f"{cls.settings.__qualname__} needs a default for every key (not so: {keys})"
        ) from exc
    taken = _REGISTRY.get(cls.name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"proposer name {cls.name!r} is registered twice: by {taken.__module__}.{taken.__qualname__} "
            f"and by {cls.__module__}.{cls.__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def registrations() -> dict[str, type[PluggableProposer]]:
    """The proposers registered so far, by name, alphabetically (`registered` imports the modules first)."""
    return dict(sorted(_REGISTRY.items()))
