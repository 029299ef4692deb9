"""The `tune` proposer: Optuna's TPE sampler turning the numeric knobs of the editable files.

It needs no LLM: each proposal rewrites only the lines of the constants it changes, and every outcome is
told back to the study, so later trials concentrate where the metric was good.

Its section is `[proposer.tune]` (`TuneSection`). optuna is imported where a study is made or told, not at
the top: every run imports this module to find the registered proposers, and most runs never tune.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from nightlab.config import ConfigError, load_config
from nightlab.research.edits import SearchReplace, format_search_replace, is_editable
from nightlab.research.proposers.base import (
    Outcome,
    PastExperiment,
    PluggableProposer,
    Proposal,
    ProposalContext,
    ProposerSettings,
    register,
)
from nightlab.research.proposers.knobs import Knob, find_knobs, format_number, source_lines

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import Trial

    from nightlab.config import NightlabConfig

# How often to re-ask the sampler when a trial rounds to the values already in the files.
_MAX_NO_OP_TRIALS = 20
_MEASURED = ("keep", "discard", "duplicate")  # a duplicate comes back with its earlier result


class KnobRange(ProposerSettings):
    """The values one knob may take: `{ low = 1e-4, high = 1e-1, log = true }` in [proposer.tune.knobs]."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> KnobRange:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        return self


class TuneSection(ProposerSettings):
    """`[proposer.tune]`: which knobs to turn, over which ranges, and the sampler's seed."""

    knobs: dict[str, KnobRange] = Field(
        default_factory=dict,
        description="NAME -> range; empty means every top-level UPPER_CASE number of the editable files",
    )
    seed: int = 0


def default_range(value: int | float) -> KnobRange | None:
    """A search range around a constant's current value; None for values with no natural scale (<= 0)."""
    if value <= 0:
        return None
    if isinstance(value, int):
        return KnobRange(low=max(1, value // 2), high=max(2, value * 2), integer=True)
    return KnobRange(low=value / 4, high=value * 4, log=True)


def _distribution(knob_range: KnobRange) -> BaseDistribution:
    from optuna.distributions import FloatDistribution, IntDistribution

    if knob_range.integer:
        return IntDistribution(math.ceil(knob_range.low), math.floor(knob_range.high), log=knob_range.log)
    return FloatDistribution(knob_range.low, knob_range.high, log=knob_range.log)


def search_space(config: TuneSection, knobs: Mapping[str, Knob]) -> dict[str, BaseDistribution]:
    """The configured knob ranges, or a default range for each discovered constant (seeds aside) if none."""
    if config.knobs:
        missing = sorted(set(config.knobs) - set(knobs))
        if missing:
            raise ConfigError(
                f"[proposer.tune.knobs] names {missing}, but the editable Python files define no top-level "
                f"`NAME = number` line for them (found: {sorted(knobs) or 'none'}); fix the names or add the "
                "constants"
            )
        return {name: _distribution(r) for name, r in config.knobs.items()}
    # Seeds are left out unless listed: a new seed only moves the noise, and "wins" from it do not last.
    space = {
        name: _distribution(r)
        for name, k in knobs.items()
        if "SEED" not in name and (r := default_range(k.value)) is not None
    }
    if not space:
        raise ConfigError(
            "the tune proposer found nothing to tune: the editable Python files have no top-level "
            "`UPPER_CASE = <positive number>` constant; add some, or list knobs in [proposer.tune.knobs]"
        )
    return space


def _read_editable_python(root: Path) -> dict[str, str]:
    editable = load_config(root).workspace.editable
    files = {}
    for pattern in editable:
        for path in root.glob(pattern):
            rel = path.relative_to(root).as_posix()
            if (
                path.suffix == ".py"
                and path.is_file()
                and not path.is_symlink()
                and is_editable(rel, editable)
            ):
                files[rel] = path.read_text(encoding="utf-8")
    return files


def _block(path: str, text: str, knobs: list[Knob], literals: dict[str, str]) -> SearchReplace:
    """One block per file, spanning its changed lines plus enough context to match only one place.

    A single block per file, matched against the unedited text, cannot be disturbed by an earlier block.
    """
    lines = [ln if ln.endswith("\n") else ln + "\n" for ln in source_lines(text)]
    new_lines = list(lines)
    for knob in sorted(knobs, key=lambda k: k.start, reverse=True):  # right to left keeps offsets valid
        i = knob.lineno - 1
        new_lines[i] = new_lines[i][: knob.start] + literals[knob.name] + new_lines[i][knob.end :]
    whole = "".join(lines)
    lo, hi = min(k.lineno for k in knobs) - 1, max(k.lineno for k in knobs)
    while whole.count("".join(lines[lo:hi])) > 1 and (lo > 0 or hi < len(lines)):
        lo, hi = (lo - 1, hi) if lo > 0 else (lo, hi + 1)
    return SearchReplace(path, "".join(lines[lo:hi]), "".join(new_lines[lo:hi]))


@register
class TuneProposer(PluggableProposer):
    """Proposes new values for numeric constants, chosen by a seeded Optuna TPE study."""

    name = "tune"
    settings = TuneSection

    @classmethod
    def from_config(cls, settings: TuneSection, workspace: Path, config: NightlabConfig) -> TuneProposer:
        return cls(settings, workspace, config.metric.goal)

    def __init__(
        self,
        config: TuneSection,
        files: Mapping[str, str] | Path,
        goal: Literal["minimize", "maximize"],
        max_trials: int | None = None,
    ) -> None:
        """`files` are the editable files (or a workspace root to read them from); they fix the ranges.

        `max_trials` bounds the number of proposals; by default the tuner never runs out.
        """
        import optuna
        from optuna.distributions import IntDistribution

        texts = _read_editable_python(files) if isinstance(files, Path) else dict(files)
        self.space = search_space(config, find_knobs(texts))
        self._integer = {name for name, dist in self.space.items() if isinstance(dist, IntDistribution)}
        self.max_trials = max_trials
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(direction=goal, sampler=optuna.samplers.TPESampler(seed=config.seed))
        self._explorer = optuna.samplers.RandomSampler(seed=config.seed)
        self._pending: list[tuple[str, Trial]] = []
        self._proposed = 0

    def propose(self, context: ProposalContext) -> Proposal | None:
        if self.max_trials is not None and self._proposed >= self.max_trials:
            return None
        if not self.study.trials:
            self._learn_from(context.history)
        # The base is the current best, which may differ from the files we started with: locate again.
        knobs = find_knobs(context.files)
        space = {name: dist for name, dist in self.space.items() if name in knobs}
        if not space:
            return None
        for _ in range(_MAX_NO_OP_TRIALS):
            trial = self._ask(space, explore=context.plateau > 0)
            literals = {
                name: format_number(value, name in self._integer) for name, value in trial.params.items()
            }
            changed = [knobs[name] for name, lit in literals.items() if float(lit) != knobs[name].value]
            if changed:
                break
            # These values are what the best code already runs with: its metric is this trial's result.
            self._tell(trial, context.best_metric)
        else:
            return None
        self._proposed += 1
        by_file: dict[str, list[Knob]] = {}
        for knob in changed:
            by_file.setdefault(knob.path, []).append(knob)
        blocks = [_block(path, context.files[path], ks, literals) for path, ks in sorted(by_file.items())]
        patch = format_search_replace(blocks)
        self._pending.append((patch, trial))
        return Proposal(
            description="tune: " + ", ".join(f"{k.name} {k.literal} -> {literals[k.name]}" for k in changed),
            patch=patch,
            patch_format="search_replace",
            rationale=f"Optuna TPE trial {trial.number} over {', '.join(sorted(space))}",
            params={name: float(lit) for name, lit in literals.items()},
        )

    def feedback(self, proposal: Proposal, outcome: Outcome) -> None:
        index = next((i for i, (patch, _) in enumerate(self._pending) if patch == proposal.patch), None)
        if index is None:
            return  # not one of ours (e.g. a baseline or another proposer's change)
        _, trial = self._pending.pop(index)
        metric = outcome.metric
        measured = outcome.decision in _MEASURED and metric is not None and math.isfinite(metric)
        self._tell(trial, metric if measured else None)

    def _ask(self, space: dict[str, BaseDistribution], explore: bool) -> Trial:
        """The next trial from TPE, or on a plateau from a seeded random sampler: TPE narrows onto the region
        it believes best, and when nothing there is kept any more, wider samples are the way out."""
        if not explore:
            return self.study.ask(space)
        tpe, self.study.sampler = self.study.sampler, self._explorer
        try:
            return self.study.ask(space)
        finally:
            self.study.sampler = tpe

    def _tell(self, trial: Trial, value: float | None) -> None:
        """The trial's value, or a failed trial when there is none."""
        from optuna.trial import TrialState

        if value is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, value)

    def _learn_from(self, history: list[PastExperiment]) -> None:
        """Seed a fresh study with earlier tune experiments of this run, so a resumed run keeps learning."""
        from optuna.trial import TrialState, create_trial

        for past in history:
            if not past.params or not set(past.params) <= set(self.space):
                continue
            dists = {name: self.space[name] for name in past.params}
            params = {n: int(v) if n in self._integer else v for n, v in past.params.items()}
            measured = past.decision in _MEASURED and past.metric is not None and math.isfinite(past.metric)
            try:
                self.study.add_trial(
                    create_trial(
                        params=params,
                        distributions=dists,
                        value=past.metric if measured else None,
                        state=TrialState.COMPLETE if measured else TrialState.FAIL,
                    )
                )
            except ValueError:
                continue  # outside today's ranges: nothing to learn for this space
