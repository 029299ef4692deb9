"""The `nightlab.toml` schema: what a workspace declares, validated so that every error names its key.

The `[proposer.<name>]` tables are the exception: each proposer declares its own in its module
(nightlab/research/proposers/), and `ProposerSection` validates them with the registered models.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from nightlab.errors import NightlabError
from nightlab.paths import expand

CONFIG_NAME = "nightlab.toml"


class ConfigError(NightlabError, ValueError):
    """A workspace config that cannot be used; the message names the file and the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkspaceSection(_Section):
    """Which files the agent may edit; everything else tracked in git is harness."""

    name: str = "workspace"
    editable: list[str] = Field(min_length=1, description="glob patterns, relative to the workspace root")
    program: str = "program.md"
    scratch: list[str] = Field(
        default_factory=list,
        description="untracked paths an experiment may write (checkpoints, logs); wiped between experiments",
    )


class ExperimentSection(_Section):
    """How one experiment runs: an optional one-off setup, the timed command, and harness scoring steps."""

    setup: str | None = Field(None, description="run once per `nightlab run`, before the baseline, untimed")
    command: str = Field(description="the training/experiment phase; its wall time is held to the budget")
    evaluate: str | None = Field(
        None, description="harness step run after `command`; when set, the metric is read from it only"
    )
    heldout: str | None = Field(None, description="harness step scoring the final best on the test split")
    checks: str | None = Field(None, description="must exit 0 before a candidate may be kept")
    budget_seconds: float = Field(60.0, gt=0)
    gpu_budget_seconds: float | None = Field(
        None,
        gt=0,
        description="the budget instead of budget_seconds when a CUDA or MPS accelerator is present",
    )
    timeout_seconds: float = Field(600.0, gt=0, description="hard kill of the whole process group")
    budget_tolerance: float = Field(0.05, ge=0, description="fraction of the budget a run may overrun")
    startup_allowance_seconds: float = Field(
        5.0,
        ge=0,
        description="seconds a training phase may take beyond the baseline's slowest one (or the budget, if "
        "longer) plus budget_tolerance * budget; and an evaluation beyond its limit (evaluate_tolerance)",
    )
    evaluate_tolerance: float = Field(
        0.5,
        ge=0,
        description="fraction of the baseline's slowest evaluation a candidate's may take beyond it (plus "
        "startup_allowance_seconds); longer is an overrun, as work done while scored escapes the budget",
    )
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for every phase")

    @model_validator(mode="after")
    def _timeout_covers_budget(self) -> ExperimentSection:
        for key in ("budget_seconds", "gpu_budget_seconds"):
            budget = getattr(self, key)
            if budget is not None and self.timeout_seconds < budget:
                raise ValueError(f"timeout_seconds ({self.timeout_seconds}) must be >= {key} ({budget})")
        return self


class MetricSection(_Section):
    """The number that decides keep or revert, and extra numbers recorded alongside it."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    goal: Literal["minimize", "maximize"] = "minimize"
    pattern: str | None = Field(
        None, description="regex with one group; default matches a `name: value` line"
    )
    channel: Literal["harness", "log"] = Field(
        "harness",
        description="harness: only signed lines from the evaluate step count; log: parse the run log",
    )
    extra: list[str] = Field(default_factory=list, description="other `name: value` lines to record")
    progress: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="a number training prints as it goes (`loss 3.2`): recorded as a curve, and a first run "
        "whose curve is hopeless is aborted (decide.early_abort); it never helps a run be kept",
    )

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return None
        try:
            groups = re.compile(pattern).groups
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from exc
        if groups > 1:
            raise ValueError(
                f"has {groups} groups; use one group around the number (or (?:...) for the others)"
            )
        return pattern


class DecideSection(_Section):
    """The noise-aware keep rule."""

    baseline_runs: int = Field(2, description="baseline repeats that estimate the noise floor (at least 2)")
    min_delta: float = Field(0.0, ge=0)
    z: float = Field(2.0, ge=0, description="a keep must beat the best by more than z * noise")
    alpha: float = Field(
        0.001, gt=0, lt=0.5, description="chance that one change which does nothing passes the re-run test"
    )
    confirm: bool = Field(
        True, description="re-run a candidate with other seeds, each beside a re-run of the best, to keep it"
    )
    confirm_runs: int = Field(
        5, ge=1, description="the most re-runs one candidate gets (each with a re-run of the best)"
    )
    implausible_sigmas: float = Field(
        50.0,
        gt=0,
        description="a first run more than this many noise units better than the best is too good to take "
        "on its word: it is quarantined until quarantine_runs paired re-runs each reproduce the gain",
    )
    quarantine_runs: int = Field(
        3, ge=1, description="paired re-runs an implausible gain must pass, every one, before it is kept"
    )
    best_possible: float | None = Field(
        None,
        description="the best value the metric can honestly reach (a loss's lower bound, an accuracy of 1); "
        "a run past it is quarantined and never kept",
    )
    early_abort: bool = Field(
        True, description="with metric.progress, stop a candidate's first run whose progress is hopeless"
    )
    abort_after: float = Field(
        0.25, ge=0, lt=1, description="the fraction of the budget before which no run is aborted"
    )
    abort_sigmas: float = Field(
        3.0, gt=0, description="how far behind every kept run's curve, in the curve's noise, is hopeless"
    )
    abort_readings: int = Field(3, ge=1, description="hopeless readings in a row that abort a run")
    abort_against: Literal["kept", "best"] = Field(
        "best",
        description="best: a run is hopeless behind the best's curve (benchmarks/early_abort.py: 40% of the "
        "losers' training saved, no keep lost); kept: behind every kept run's, the baseline's included, "
        "which saves less (15%) and never stops a slow starter that still beats the baseline",
    )

    @field_validator("baseline_runs")
    @classmethod
    def _repeated(cls, runs: int) -> int:
        if runs < 2:
            raise ValueError(
                f"must be at least 2, got {runs}: the noise floor is the spread of repeated baseline runs, "
                "and a single run has none"
            )
        return runs


def _proposer_settings() -> dict[str, type[BaseModel]]:
    """Each registered proposer's own section model, by name. Imported here rather than at the top: the
    proposers package reads this module."""
    from nightlab.research.proposers import registered

    return {name: proposer.settings for name, proposer in registered().items()}


def _nested(name: str, err: ValidationError) -> list[InitErrorDetails]:
    """The errors of one proposer's table, located under its name so that the message names the key."""
    return [
        InitErrorDetails(type=e["type"], loc=(name, *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
        for e in err.errors()
    ]


class ProposerSection(_Section):
    """`[proposer]`: which proposer runs, and the keys every proposer shares.

    Each `[proposer.<name>]` table belongs to the proposer registered under that name, whose module declares
    the table's model (nightlab/research/proposers/). Once loaded, every registered proposer's table is here,
    with its defaults where nightlab.toml has none: `section(name)`, or `config.proposer.<name>`.
    """

    model_config = ConfigDict(extra="allow")

    kind: str = Field(
        "auto", description="a registered proposer's name, or auto: llm when a model is configured, else tune"
    )
    outage_seconds: float = Field(
        1800.0, ge=0, description="how long the loop retries a proposer whose service is down before it stops"
    )
    memory_tokens: int = Field(
        4000,
        ge=200,
        description="tokens of the run's history a proposer's brief may hold, however long the run",
    )
    memory_notes: Literal["off", "llm"] = Field(
        "off",
        description="llm: the memory's counted groups (failures by cause, ideas tried more than once) each "
        "get a one-sentence lesson from [proposer.llm]'s model, cached in .nightlab/memory_notes.json and "
        "asked again only when a group grows, at most 3 a proposal; off: the deterministic memory only",
    )
    plateau_after: int = Field(
        20, ge=0, description="candidates in a row that keep nothing make a plateau (0: never)"
    )
    on_plateau: Literal["explore", "stop"] = Field(
        "explore",
        description="on a plateau, explore: the proposer is told (the llm to change direction, tune to "
        "sample at random until the next keep); stop: the run ends, saying so",
    )

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        names = ["auto", *_proposer_settings()]
        if kind not in names:
            raise ValueError(f"unknown proposer {kind!r}; choose one of {', '.join(names)}")
        return kind

    @model_validator(mode="after")
    def _own_sections(self) -> ProposerSection:
        """Validate each table with its proposer's model, and fill in the tables nightlab.toml leaves out."""
        models = _proposer_settings()
        given = self.__pydantic_extra__ or {}
        unknown = PydanticCustomError(
            "unknown_proposer",
            "unknown key; [proposer] holds kind, outage_seconds and a table for each registered proposer "
            "({names})",
            {"names": ", ".join(models)},
        )
        errors = [
            InitErrorDetails(type=unknown, loc=(key,), input=given[key]) for key in given if key not in models
        ]
        sections: dict[str, BaseModel] = {}
        for name, model in models.items():
            try:
                sections[name] = model.model_validate(given.get(name, {}))
            except ValidationError as exc:
                errors += _nested(name, exc)
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        self.__pydantic_extra__ = sections
        return self

    def section(self, name: str) -> BaseModel:
        """The validated `[proposer.<name>]` table of a registered proposer."""
        return (self.__pydantic_extra__ or {})[name]


class SandboxSection(_Section):
    """The bubblewrap jail every phase runs in (see docs/integrity.md); `~` and `$VARS` in paths expand."""

    mode: Literal["auto", "required", "off"] = "auto"
    network: bool = Field(False, description="network in train/evaluate/heldout/checks; setup always has it")
    read_only: list[str] = Field(
        default_factory=list,
        description="host data paths visible read-only (writable, and created, in the setup phase that "
        "prepares them)",
    )
    setup_read_only: list[str] = Field(
        default_factory=list,
        description="host paths visible read-only to the setup phase only (e.g. a raw corpus holding the "
        "val/test text)",
    )
    writable: list[str] = Field(
        default_factory=list,
        description="host directories the setup and train phases may write (data and compile caches), "
        "read-only in the others; created when missing",
    )
    train_hidden: list[str] = Field(
        default_factory=list, description="host paths hidden during `command` (e.g. the validation split)"
    )
    eval_hidden: list[str] = Field(
        default_factory=list,
        description="host paths hidden from every phase but `heldout` (e.g. the test split)",
    )

    def hidden_paths(self) -> list[Path]:
        """Every path some phase may not see, expanded: what a proposer must not show or read either."""
        return [Path(expand(p)) for p in self.eval_hidden + self.train_hidden]


class HubSection(_Section):
    """A results hub this workspace's runs post to (`nightlab hub serve`); the token comes from the
    environment (NIGHTLAB_HUB_TOKEN) or `--hub-token`, never from a file in the repo."""

    url: str | None = Field(None, description="e.g. http://lab-hub:8700; empty: post nowhere")


class ParallelSection(_Section):
    """`[parallel]`: experiments at once on Ray (`nightlab run --workers N`), each in its own git worktree."""

    workers: int = Field(1, ge=1, description="experiments at once; 1 runs them one by one, without Ray")
    cpus_per_experiment: float = Field(
        1.0, gt=0, description="CPUs Ray reserves for each experiment (fractions allowed)"
    )
    gpus_per_experiment: float = Field(
        0.0, ge=0, description="GPUs Ray reserves for each experiment (1 gives each its own card)"
    )
    ray_address: str | None = Field(
        None, description="an existing Ray cluster (e.g. ray://head:10001 or auto); empty: start one here"
    )
    max_rebases: int = Field(
        3,
        ge=0,
        description="how often a passing candidate is rebased onto a best that moved while it ran, and run "
        "again, before it is recorded stale",
    )


class NightlabConfig(_Section):
    workspace: WorkspaceSection
    experiment: ExperimentSection
    metric: MetricSection
    decide: DecideSection = Field(default_factory=DecideSection)
    proposer: ProposerSection = Field(default_factory=ProposerSection)
    sandbox: SandboxSection = Field(default_factory=SandboxSection)
    hub: HubSection = Field(default_factory=HubSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)

    @field_validator("workspace")
    @classmethod
    def _editable_inside(cls, ws: WorkspaceSection) -> WorkspaceSection:
        for pattern in ws.editable:
            if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
                raise ValueError(f"editable pattern {pattern!r} must be relative and inside the workspace")
        return ws


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def parse_config(text: str, source: Path = Path(CONFIG_NAME)) -> NightlabConfig:
    """Parse TOML text into a validated config; raise ConfigError naming the bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return NightlabConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from exc


def load_config(workspace: Path) -> NightlabConfig:
    """Load `nightlab.toml` from a workspace directory."""
    path = Path(workspace) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {workspace} a nightlab workspace? (try `nightlab init`)")
    return parse_config(path.read_text(encoding="utf-8"), path)
