"""Proposers are found by name: each module registers itself and owns its `[proposer.<name>]` section."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from nightlab.config import ConfigError, NightlabConfig, load_config, parse_config
from nightlab.research import proposers
from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.proposers import base, check_run_options, make_proposer, registered, resolve_kind
from nightlab.research.proposers.agent import AgentSection
from nightlab.research.proposers.llm import LLMSection
from nightlab.research.proposers.replay import ReplayProposer, ReplaySection
from nightlab.research.proposers.tune import TuneSection
from tests.research.loop_workspace import make_workspace, replace_block

CONFIG = """
[workspace]
editable = ["train.py"]
[experiment]
command = "python train.py"
[metric]
name = "loss"
"""

# A whole proposer in one file: it sets one constant of the editable files to each listed value in turn.
STEPPER = '''
"""The `stepper` proposer: tries each value of one constant, in order."""

from __future__ import annotations

from nightlab.research.edits import SearchReplace, format_search_replace
from nightlab.research.proposers.base import (
    PluggableProposer, Proposal, ProposerSettings, register,
)
from nightlab.research.proposers.knobs import find_knobs


class StepperSection(ProposerSettings):
    knob: str = "LEARNING_RATE"
    values: list[float] = []


@register
class StepperProposer(PluggableProposer):
    name = "stepper"
    settings = StepperSection

    @classmethod
    def from_config(cls, settings, workspace, config):
        return cls(settings)

    def __init__(self, settings):
        self.section = settings
        self.outcomes = []

    def propose(self, context):
        done = len(context.history)
        if done == len(self.section.values):
            return None
        knob = find_knobs(context.files)[self.section.knob]
        value = repr(self.section.values[done])
        new_line = knob.line[: knob.start] + value + knob.line[knob.end :]
        patch = format_search_replace([SearchReplace(knob.path, knob.line, new_line)])
        return Proposal(f"step {knob.name} to {value}", patch)

    def feedback(self, proposal, outcome):
        self.outcomes.append(outcome.decision)
'''


@pytest.fixture
def no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIGHTLAB_LLM_MODEL", raising=False)


@pytest.fixture
def stepper_file(tmp_path, monkeypatch):
    """The stepper module in a directory of the proposers package's search path, gone again afterwards."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "stepper.py").write_text(STEPPER)
    monkeypatch.setattr(proposers, "__path__", [*proposers.__path__, str(plugins)])
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    yield
    sys.modules.pop(f"{proposers.__name__}.stepper", None)


def test_the_built_in_proposers_register_themselves_with_their_sections() -> None:
    found = registered()
    assert list(found) == ["agent", "hub", "llm", "replay", "tune"]
    assert found["agent"].settings is AgentSection
    assert (found["llm"].settings, found["replay"].settings, found["tune"].settings) == (
        LLMSection,
        ReplaySection,
        TuneSection,
    )
    assert found["hub"].settings is base.ProposerSettings  # nothing to set: it tries what `hub pull` fetched


def test_every_registered_section_is_present_with_its_defaults_and_round_trips() -> None:
    config = parse_config(CONFIG + '[proposer.llm]\nmodel = "m"\n')
    assert config.proposer.section("llm") == LLMSection(model="m") and config.proposer.llm.model == "m"
    assert config.proposer.section("tune") == TuneSection() and config.proposer.replay.patches == "patches"
    # A run stores its config as JSON; the report reads it back through the same models.
    assert NightlabConfig.model_validate(config.model_dump(mode="json")) == config


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        (
            '[proposer]\nkind = "nope"',
            "proposer.kind: Value error, unknown proposer 'nope'; choose one of auto, agent, hub, llm",
        ),
        ("[proposer.llm]\nmodle = 1", "proposer.llm.modle: Extra inputs are not permitted"),
        ('[proposer.llm]\ntemperature = "hot"', "proposer.llm.temperature: Input should be a valid number"),
        (
            "[proposer.tune.knobs]\nA = { low = 2, high = 1 }",
            "proposer.tune.knobs.A: Value error, low (2.0) must be below high (1.0)",
        ),
        (
            "[proposer.bot]\ncommand = 'x'",
            "proposer.bot: unknown key; [proposer] holds kind, outage_seconds and a table for each "
            "registered proposer (agent, hub, llm, replay, tune)",
        ),
    ],
)
def test_proposer_errors_name_the_file_and_the_key(toml: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(CONFIG + toml)
    assert str(caught.value).startswith("nightlab.toml: invalid config") and words in str(caught.value)


def test_auto_is_llm_when_a_model_is_configured_else_tune(no_llm_env, monkeypatch) -> None:
    assert resolve_kind(parse_config(CONFIG)) == "tune"
    assert resolve_kind(parse_config(CONFIG + '[proposer.llm]\nmodel = "m"\n')) == "llm"
    monkeypatch.setenv("NIGHTLAB_LLM_MODEL", "env-model")
    assert resolve_kind(parse_config(CONFIG)) == "llm"
    assert resolve_kind(parse_config(CONFIG), "replay") == "replay"
    with pytest.raises(
        ConfigError, match="unknown proposer 'nope' .*choose one of auto, agent, hub, llm, replay, tune"
    ):
        resolve_kind(parse_config(CONFIG), "nope")


def test_the_price_check_for_a_cost_cap_belongs_to_the_llm_proposer(no_llm_env) -> None:
    unpriced = parse_config(CONFIG + '[proposer.llm]\nmodel = "m"\n')
    with pytest.raises(ConfigError, match="--max-cost needs the model's prices"):
        check_run_options(unpriced, None, max_cost=1.0)
    check_run_options(unpriced, None, max_cost=None)
    check_run_options(unpriced, "tune", max_cost=1.0)  # no money to count
    priced = parse_config(CONFIG + '[proposer.llm]\nmodel = "m"\noutput_price_per_mtok = 0.6\n')
    check_run_options(priced, "llm", max_cost=1.0)


def test_a_proposer_is_built_from_its_own_section(tmp_path) -> None:
    (tmp_path / "mine").mkdir()
    config = parse_config(CONFIG + '[proposer.replay]\npatches = "mine"\n')
    (tmp_path / "mine" / "1.md").write_text(replace_block("A = 1", "A = 2"))
    replay = make_proposer(config, tmp_path, "replay")
    assert isinstance(replay, ReplayProposer) and replay.directory == tmp_path / "mine"


def test_a_proposer_class_must_be_complete_and_its_name_free(monkeypatch) -> None:
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class Unbuildable(base.PluggableProposer):
        name = "unbuildable"

    with pytest.raises(TypeError, match="Unbuildable must implement from_config"):
        base.register(Unbuildable)

    class Required(base.ProposerSettings):
        command: str

    class Demanding(ReplayProposer):
        name = "demanding"
        settings = Required

    with pytest.raises(TypeError, match=r"Required needs a default for every key \(not so: command\)"):
        base.register(Demanding)

    class Twin(ReplayProposer):
        pass

    with pytest.raises(ValueError, match="proposer name 'replay' is registered twice"):
        base.register(Twin)
    Twin.name = "auto"
    with pytest.raises(ValueError, match="must be a lower-case identifier, not auto"):
        base.register(Twin)


def test_a_replay_run_loads_neither_optuna_nor_openai(tmp_path, no_llm_env) -> None:
    root = make_workspace(
        tmp_path,
        config={
            "decide": {"baseline_runs": 2},
            "experiment": {"heldout": None},
            "proposer.llm": {"model": "m"},
        },
        patches={"1.md": replace_block("WIDTH = 4", "WIDTH = 8")},
    )
    script = textwrap.dedent(
        f"""
        import sys
        from nightlab.research.loop import ResearchLoop, RunOptions
        state = ResearchLoop({str(root)!r}, RunOptions(tag="lazy", proposer="replay")).run_loop()
        assert state.experiments == 1, state.stop_reason
        print(sorted({{"optuna", "openai"}} & set(sys.modules)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_new_proposer_is_one_file(tmp_path, no_llm_env, stepper_file) -> None:
    root = make_workspace(
        tmp_path,
        config={
            "proposer": {"kind": "stepper"},
            "proposer.stepper": {"knob": "LEARNING_RATE", "values": [0.05, 0.9]},
            "experiment": {"heldout": None},
        },
    )
    assert resolve_kind(load_config(root)) == "stepper"
    loop = ResearchLoop(root, RunOptions(tag="steps", max_cost=1.0))  # it has no prices to check
    state = loop.run_loop()
    assert state.stop_reason == "the proposer has nothing more to try"
    journal = Journal.for_workspace(root)
    rows = [r for r in journal.experiments(1) if r.kind == "candidate"]
    journal.close()
    assert [(r.description, r.proposer) for r in rows] == [
        ("step LEARNING_RATE to 0.05", "stepper"),
        ("step LEARNING_RATE to 0.9", "stepper"),
    ]
    assert loop.proposer.outcomes == [r.decision for r in rows] and rows[0].decision == "keep"
    assert "LEARNING_RATE = 0.05" in (root / "train.py").read_text()


def test_a_new_proposer_owns_its_section_and_joins_the_names(tmp_path, stepper_file) -> None:
    with pytest.raises(ConfigError, match=r"proposer.stepper.values: Input should be a valid list"):
        parse_config(CONFIG + '[proposer.stepper]\nvalues = "all of them"\n')
    with pytest.raises(ConfigError, match="choose one of auto, agent, hub, llm, replay, stepper, tune"):
        resolve_kind(parse_config(CONFIG), "nope")
