"""`nightlab recipe ...`: each recipe's command, its options made from the recipe's settings dataclass."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, NoReturn

import typer

from nightlab.console import fail
from nightlab.errors import NightlabError
from nightlab.recipes.common.cli_options import add_settings_command, settings_from
from nightlab.recipes.rl import PLOT_FILE, RLConfig
from nightlab.recipes.s1 import S1Config

recipe_app = typer.Typer(
    help="Post-training recipes run through `nightlab serve`: s1, rl.", no_args_is_help=True
)
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

    steps = {"collect": s1.collect, "curate": s1.curate, "train": s1.train, "all": s1.run_all}
    if step not in S1_STEPS:
        fail(ValueError(f"unknown step {step!r}: use collect, curate, train, evaluate or all"))
    cfg = settings_from(S1Config, values)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    try:
        if step == "evaluate":
            s1.evaluate(cfg, model=checkpoint)
        else:
            steps[step](cfg)
    except _recipe_errors() as exc:
        _recipe_fail(exc, cfg.base_url)


def _run_rl(**values: Any) -> None:
    from nightlab.recipes.rl import run_rl

    try:
        cfg = settings_from(RLConfig, values)
        rows = run_rl(cfg)
    except _recipe_errors() as exc:
        _recipe_fail(exc, values["base_url"])
    first, last = rows[0]["reward_mean"], rows[-1]["reward_mean"]
    typer.echo(
        f"reward {first:.3f} -> {last:.3f} over {len(rows)} steps; see {Path(cfg.log_dir) / PLOT_FILE}"
    )


def _leading(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


add_settings_command(
    recipe_app,
    "s1",
    S1Config,
    _run_s1,
    leading=[
        _leading(
            "step",
            str,
            typer.Argument(help="collect, curate, train, evaluate, or all (each skips finished work)."),
        ),
        _leading(
            "checkpoint",
            str | None,
            typer.Option(
                None,
                help="evaluate: a tinker:// sampler path or base model name (default: the trained weights).",
            ),
        ),
    ],
    doc="s1: collect teacher traces, curate, LoRA SFT with thinking, evaluate accuracy vs thinking budget.",
)
add_settings_command(
    recipe_app,
    "rl",
    RLConfig,
    _run_rl,
    doc="GRPO-style RL with LoRA: groups of samples from the latest weights, group-relative advantages.",
)
