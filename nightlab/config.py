"""The `nightlab.toml` schema: what a workspace declares, validated so that every error names its key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_NAME = "nightlab.toml"


class ConfigError(ValueError):
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
        description="seconds a training phase may take beyond the baseline's slowest one (or the budget, if longer) "
        "plus budget_tolerance * budget",
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
    confirm: bool = Field(True, description="re-run a candidate with other seeds before keeping it")
    confirm_k: float = Field(
        4.0, ge=0, description="first-run margins under confirm_k * noise are always re-run"
    )
    confirm_runs: int = Field(5, ge=1, description="the most re-runs one candidate gets")

    @field_validator("baseline_runs")
    @classmethod
    def _repeated(cls, runs: int) -> int:
        if runs < 2:
            raise ValueError(
                f"must be at least 2, got {runs}: the noise floor is the spread of repeated baseline runs, "
                "and a single run has none"
            )
        return runs


class LLMSection(_Section):
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_retries: int = Field(3, ge=0, description="re-asks after a malformed answer")
    temperature: float = 0.7
    input_price_per_mtok: float = Field(0.0, ge=0)
    output_price_per_mtok: float = Field(0.0, ge=0)
    history_limit: int = Field(30, ge=1)


class KnobRange(_Section):
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


class TuneSection(_Section):
    knobs: dict[str, KnobRange] = Field(
        default_factory=dict,
        description="NAME -> range; empty means every top-level UPPER_CASE numeric constant of the editable files",
    )
    seed: int = 0


class ReplaySection(_Section):
    patches: str = "patches"


class ProposerSection(_Section):
    kind: Literal["auto", "llm", "tune", "replay"] = "auto"
    outage_seconds: float = Field(
        1800.0, ge=0, description="how long the loop retries a proposer whose service is down before it stops"
    )
    llm: LLMSection = Field(default_factory=LLMSection)
    tune: TuneSection = Field(default_factory=TuneSection)
    replay: ReplaySection = Field(default_factory=ReplaySection)


class SandboxSection(_Section):
    """The bubblewrap jail every phase runs in (see docs/integrity.md); `~` and `$VARS` in paths expand."""

    mode: Literal["auto", "required", "off"] = "auto"
    network: bool = Field(False, description="network in train/evaluate/heldout/checks; setup always has it")
    read_only: list[str] = Field(
        default_factory=list,
        description="host data paths visible read-only (writable, and created, in the setup phase that prepares them)",
    )
    setup_read_only: list[str] = Field(
        default_factory=list,
        description="host paths visible read-only to the setup phase only (e.g. a raw corpus holding the val/test text)",
    )
    writable: list[str] = Field(
        default_factory=list,
        description="host directories the setup and train phases may write (data and compile caches), read-only "
        "in the others; created when missing",
    )
    train_hidden: list[str] = Field(
        default_factory=list, description="host paths hidden during `command` (e.g. the validation split)"
    )
    eval_hidden: list[str] = Field(
        default_factory=list,
        description="host paths hidden from every phase but `heldout` (e.g. the test split)",
    )


class NightlabConfig(_Section):
    workspace: WorkspaceSection
    experiment: ExperimentSection
    metric: MetricSection
    decide: DecideSection = Field(default_factory=DecideSection)
    proposer: ProposerSection = Field(default_factory=ProposerSection)
    sandbox: SandboxSection = Field(default_factory=SandboxSection)

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
