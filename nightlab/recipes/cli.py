"""`nightlab recipe ...`: one command per recipe, its options made from the recipe's settings model.

A recipe's module imports the tinker client (and with it torch), so its command is built only when it is asked
for: every other `nightlab` command starts without loading either.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Annotated, Any, NoReturn, cast

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from nightlab.console import fail
from nightlab.errors import NightlabError

S1_STEPS = ("collect", "curate", "train", "evaluate", "all")


def _recipe_errors() -> tuple[type[BaseException], ...]:
    """What a recipe raises when the user can act on it: our own errors, bad values, files, the clients'."""
    import httpx
    import openai
    import tinker

    return NightlabError, ValueError, OSError, tinker.TinkerError, openai.OpenAIError, httpx.TransportError


def _recipe_fail(exc: BaseException, base_url: str) -> NoReturn:
    """A lost connection says how to start the service at `base_url`; other errors are shown as they are."""
    import httpx
    import openai

    from nightlab.recipes.common.service import unreachable_message

    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        fail(RuntimeError(unreachable_message(base_url, exc)))
    fail(exc)


def _run_s1(step: str, checkpoint: str | None, **values: Any) -> None:
    from nightlab.recipes import s1
    from nightlab.recipes.common.cli_options import settings_from

    steps = {"collect": s1.collect, "curate": s1.curate, "train": s1.train, "all": s1.run_all}
    if step not in S1_STEPS:
        fail(ValueError(f"unknown step {step!r}: use {', '.join(S1_STEPS[:-1])} or {S1_STEPS[-1]}"))
    try:
        cfg = settings_from(s1.S1Config, values)
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        if step == "evaluate":
            s1.evaluate(cfg, model=checkpoint)
        else:
            steps[step](cfg)
    except _recipe_errors() as exc:
        _recipe_fail(exc, values["base_url"])


def _run_rl(**values: Any) -> None:
    from nightlab.recipes.common.cli_options import settings_from
    from nightlab.recipes.rl import PLOT_FILE, RLConfig, run_rl

    try:
        cfg = settings_from(RLConfig, values)
        rows = run_rl(cfg)
    except _recipe_errors() as exc:
        _recipe_fail(exc, values["base_url"])
    first, last = rows[0]["reward_mean"], rows[-1]["reward_mean"]
    typer.echo(
        f"reward {first:.3f} -> {last:.3f} over {len(rows)} steps; see {Path(cfg.log_dir) / PLOT_FILE}"
    )


def _run_vlm_classify(**values: Any) -> None:
    from rich.console import Console

    from nightlab.recipes.common.cli_options import settings_from
    from nightlab.recipes.vlm_classify import PLOT_FILE, VLMClassifyConfig, accuracy_table, run_vlm_classify

    try:
        cfg = settings_from(VLMClassifyConfig, values)
        rows = run_vlm_classify(cfg)
    except _recipe_errors() as exc:
        _recipe_fail(exc, values["base_url"])
    Console().print(accuracy_table(rows))
    typer.echo(f"plot: {Path(cfg.log_dir) / PLOT_FILE}")


def _parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _settings_command(name: str, settings: type, run: Callable[..., None], **kwargs: Any) -> TyperCommand:
    from nightlab.recipes.common.cli_options import add_settings_command

    app = typer.Typer(add_completion=False)
    add_settings_command(app, name, settings, run, **kwargs)
    return cast(TyperCommand, typer.main.get_command(app))


@cache
def _s1_command() -> TyperCommand:
    from nightlab.recipes.s1 import S1Config

    doc = "s1: collect teacher traces, curate, LoRA SFT with thinking, evaluate accuracy vs thinking budget."
    step_help = "collect, curate, train, evaluate, or all (each skips finished work)."
    checkpoint_help = "evaluate: a tinker:// sampler path or base model name (default: the trained weights)."
    return _settings_command(
        "s1",
        S1Config,
        _run_s1,
        leading=[
            _parameter("step", str, typer.Argument(help=step_help)),
            _parameter("checkpoint", str | None, typer.Option(None, help=checkpoint_help)),
        ],
        doc=doc,
    )


@cache
def _rl_command() -> TyperCommand:
    from nightlab.recipes.rl import RLConfig

    return _settings_command(
        "rl",
        RLConfig,
        _run_rl,
        doc="GRPO-style RL with LoRA: groups of samples from the latest weights, group-relative advantages.",
    )


@cache
def _vlm_classify_command() -> TyperCommand:
    from nightlab.recipes.vlm_classify import VLMClassifyConfig

    return _settings_command(
        "vlm-classify",
        VLMClassifyConfig,
        _run_vlm_classify,
        doc="Few-shot image classification: VLM + LoRA vs a linear probe on its vision encoder, at k shots.",
    )


def _run_online(**values: Any) -> None:
    from nightlab.recipes.common.cli_options import settings_from
    from nightlab.recipes.common.plots import plot_online
    from nightlab.recipes.online.loop import OnlineConfig, demo_questions, load_rubric, run_online
    from nightlab.recipes.online.reward import JudgeReward
    from nightlab.recipes.online.status import PLOT_FILE, summary
    from nightlab.recipes.online.user import SimulatedUser

    try:
        cfg = settings_from(OnlineConfig, values)
        judge = JudgeReward(cfg.judge_url, cfg.judge_model, cfg.judge_api_key, cfg.judge_rubric)
        rubric = load_rubric(cfg.rubric)
        visit = None
        if cfg.simulate_users:
            user = SimulatedUser(cfg.base_url, cfg.api_key, cfg.alias, max_tokens=cfg.max_tokens)

            def visit(k: int) -> None:
                user.visit(demo_questions(k, cfg.simulate_users, cfg.seed))

        rows = run_online(cfg, judge, rubric, visit)
    except _recipe_errors() as exc:
        _recipe_fail(exc, values["base_url"])
    plot_online(rows, cfg.log_dir / PLOT_FILE)
    typer.echo(f"{summary(rows)}; `nightlab online status {cfg.log_dir}`")


@cache
def _online_command() -> TyperCommand:
    from nightlab.recipes.online.loop import OnlineConfig

    return _settings_command(
        "run",
        OnlineConfig,
        _run_online,
        doc="Rounds of feedback -> reward model -> RL -> a guarded promotion of the served alias.",
    )


def online_status(log_dir: Annotated[Path, typer.Argument(help="The online run's log directory.")]) -> None:
    """Feedback volume, reward over the rounds, promotions and refusals (and online.png)."""
    from rich.console import Console

    from nightlab.recipes.common.plots import plot_online
    from nightlab.recipes.online.journal import read_rounds
    from nightlab.recipes.online.status import PLOT_FILE, status_table, summary

    try:
        rows = read_rounds(log_dir)
    except (OSError, ValueError) as exc:
        fail(exc)
    Console().print(status_table(rows))
    typer.echo(summary(rows))
    typer.echo(f"plot: {plot_online(rows, log_dir / PLOT_FILE)}")


@cache
def _online_status_command() -> TyperCommand:
    app = typer.Typer(add_completion=False)
    app.command("status")(online_status)
    return cast(TyperCommand, typer.main.get_command(app))


RECIPES: dict[str, Callable[[], TyperCommand]] = {
    "s1": _s1_command,
    "rl": _rl_command,
    "vlm-classify": _vlm_classify_command,
}
ONLINE: dict[str, Callable[[], TyperCommand]] = {"run": _online_command, "status": _online_status_command}


class RecipeGroup(TyperGroup):
    """The recipe commands, each built from its recipe's module the first time it is asked for."""

    commands_by_name = RECIPES

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands_by_name)

    def get_command(self, ctx: Any, cmd_name: str) -> TyperCommand | None:
        build = self.commands_by_name.get(cmd_name)
        return build() if build else None


class OnlineGroup(RecipeGroup):
    """`nightlab online run` and `status`, built when asked for, like the recipes."""

    commands_by_name = ONLINE


recipe_app = typer.Typer(
    cls=RecipeGroup,
    help="Post-training recipes run through `nightlab serve`: s1, rl, vlm-classify.",
    no_args_is_help=True,
)

online_app = typer.Typer(
    cls=OnlineGroup,
    help="The online loop: feedback on served answers, a reward model, RL, guarded promotions.",
    no_args_is_help=True,
)
