"""`nightlab recipe ...`: one command per recipe, its options made from the recipe's settings model.

A recipe's module imports the tinker client (and with it torch), so its command is built only when it is asked
for: every other `nightlab` command starts without loading either.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, NoReturn, cast

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


RECIPES: dict[str, Callable[[], TyperCommand]] = {"s1": _s1_command, "rl": _rl_command}


class RecipeGroup(TyperGroup):
    """The recipe commands, each built from its recipe's module the first time it is asked for."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(RECIPES)

    def get_command(self, ctx: Any, cmd_name: str) -> TyperCommand | None:
        build = RECIPES.get(cmd_name)
        return build() if build else None


recipe_app = typer.Typer(
    cls=RecipeGroup, help="Post-training recipes run through `nightlab serve`: s1, rl.", no_args_is_help=True
)
