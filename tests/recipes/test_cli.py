"""`nightlab recipe ...`: bad input is one clear line; the rl command runs against a real service."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.recipes import s1
from nightlab.recipes.rl import METRICS_FILE, RLConfig
from nightlab.recipes.vlm_classify import VLMClassifyConfig

runner = CliRunner()


def test_s1_unknown_step_and_missing_input_are_clear_errors(tmp_path) -> None:
    result = runner.invoke(app, ["recipe", "s1", "cook", "-w", str(tmp_path), "--model", "m"])
    assert result.exit_code == 1 and "unknown step 'cook'" in result.output
    result = runner.invoke(app, ["recipe", "s1", "curate", "-w", str(tmp_path), "--model", "m"])
    assert result.exit_code == 1 and "run collect first" in result.output
    result = runner.invoke(
        app, ["recipe", "s1", "evaluate", "-w", str(tmp_path), "--model", "m", "--budgets", "x"]
    )
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_rl_command_runs_and_reports(service, tiny_model, tmp_path) -> None:
    args = [
        "recipe",
        "rl",
        "--log-dir",
        str(tmp_path / "run"),
        "--model",
        str(tiny_model),
        "--base-url",
        service.url,
        "--api-key",
        service.api_key,
        "--env",
        "tests.recipes.plugin_env:make",
        "--steps",
        "1",
        "--prompts-per-step",
        "1",
        "--group-size",
        "2",
        "--max-tokens",
        "4",
        "--loss",
        "ppo",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "reward" in result.output and (tmp_path / "run" / METRICS_FILE).is_file()
    result = runner.invoke(app, [*args[:-2], "--loss", "sft"])
    assert result.exit_code == 1 and "importance_sampling or ppo" in result.output


def test_s1_settings_reach_the_recipe(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(s1, "collect", seen.append)
    args = [
        "recipe",
        "s1",
        "collect",
        "-w",
        str(tmp_path),
        "--model",
        "m",
        "--teacher",
        "builtin",
        "--teacher-max-tokens",
        "77",
        "--max-length",
        "99",
        "--answer-tokens",
        "5",
        "--difficulty-max-tokens",
        "33",
        "--seed",
        "4",
    ]
    assert runner.invoke(app, args).exit_code == 0
    cfg = seen[0]
    assert (
        cfg.teacher,
        cfg.teacher_max_tokens,
        cfg.max_length,
        cfg.answer_tokens,
        cfg.difficulty_max_tokens,
        cfg.seed,
    ) == ("builtin", 77, 99, 5, 33, 4)


def test_s1_collect_with_the_builtin_teacher_needs_no_network(tmp_path) -> None:
    args = [
        "recipe",
        "s1",
        "collect",
        "-w",
        str(tmp_path),
        "--model",
        "m",
        "--teacher",
        "builtin",
        "--num-questions",
        "6",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(s1.read_jsonl(tmp_path / s1.COLLECTED)) == 6


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing listens there


def test_an_unreachable_service_says_to_start_it(tmp_path) -> None:
    url = dead_url()
    runner.invoke(
        app, ["recipe", "s1", "collect", "-w", str(tmp_path), "--model", "m", "--teacher", "builtin"]
    )
    for args in (
        ["recipe", "s1", "curate", "-w", str(tmp_path), "--model", "m"],
        ["recipe", "rl", "--log-dir", str(tmp_path / "rl"), "--model", "m"],
    ):
        result = runner.invoke(app, [*args, "--base-url", url])
        assert result.exit_code == 1, result.output
        assert f"cannot reach the training service at {url}" in result.output
        assert "start it with `nightlab serve`" in result.output


def test_a_connection_lost_mid_run_says_to_start_the_service(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx
    import openai

    def lost(cfg):
        raise openai.APIConnectionError(request=httpx.Request("POST", cfg.base_url + "/v1/completions"))

    monkeypatch.setattr(s1, "curate", lost)
    result = runner.invoke(
        app,
        ["recipe", "s1", "curate", "-w", str(tmp_path), "--model", "m", "--base-url", "http://127.0.0.1:1"],
    )
    assert result.exit_code == 1 and "start it with `nightlab serve`" in result.output, result.output


def recipe_command(name: str):
    import typer.main

    group = typer.main.get_command(app)
    with group.make_context("nightlab", ["recipe", name]) as ctx:
        recipes = group.get_command(ctx, "recipe")
        return recipes.get_command(ctx, name)


@pytest.mark.parametrize(
    ("command", "settings"),
    [("s1", s1.S1Config), ("rl", RLConfig), ("vlm-classify", VLMClassifyConfig)],
)
def test_every_setting_is_an_option_with_the_same_default(command, settings) -> None:
    """Options are made from the settings model: none is missing, none has a default of its own."""
    params = {p.name: p for p in recipe_command(command).params if p.param_type_name == "option"}
    for name, info in settings.__pydantic_fields__.items():
        assert name in params, f"{name} has no option"
        if info.is_required() or name in ("model", "base_url"):
            continue
        default = info.get_default(call_default_factory=True)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        assert params[name].default == shown, name


def test_the_cli_starts_without_loading_a_recipe() -> None:
    """Every `nightlab` command imports the CLI; a recipe's module (tinker, torch) loads only for its own."""
    code = (
        "import sys, nightlab.cli; "
        "print(sorted(m for m in ('nightlab.recipes.s1', 'nightlab.recipes.rl', 'tinker', 'torch') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_rl_settings_reach_the_recipe(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service URL comes from its environment variable; a bool setting has its --no- form."""
    from nightlab.recipes import rl

    seen = []
    monkeypatch.setattr(rl, "run_rl", lambda cfg: seen.append(cfg) or [{"reward_mean": 0.5}])
    monkeypatch.setenv("TINKER_BASE_URL", "http://127.0.0.1:9")
    args = ["recipe", "rl", "--log-dir", str(tmp_path), "--model", "m", "--no-measure-kl", "--kl-coef", "0.1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (seen[0].base_url, seen[0].measure_kl, seen[0].kl_coef) == ("http://127.0.0.1:9", False, 0.1)
