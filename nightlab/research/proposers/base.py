"""The Proposer protocol: the only thing the loop knows about whatever suggests the next change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

PatchFormat = Literal["search_replace", "unified_diff"]
Decision = Literal["keep", "discard", "crash", "timeout", "invalid", "overrun"]


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


@dataclass
class Outcome:
    """What happened to a proposal, handed back so the proposer can learn (e.g. Optuna's tell)."""

    decision: Decision
    metric: float | None
    reason: str = ""


class ProposerUnavailable(RuntimeError):
    """The service behind a proposer is down even after its own retries; the loop waits and asks again."""


@runtime_checkable
class Proposer(Protocol):
    """Suggests changes one at a time; returns None when it has nothing more to offer."""

    name: str

    def propose(self, context: ProposalContext) -> Proposal | None:
        """The next change, or None when there is nothing more to try; raises ProposerUnavailable in an outage."""
        ...

    def feedback(self, proposal: Proposal, outcome: Outcome) -> None: ...
