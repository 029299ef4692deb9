"""`nightlab recipe ...`: bad input is one clear line; the rl command runs against a real service."""

from __future__ import annotations

from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.recipes.rl import METRICS_FILE

runner = CliRunner()


def test_s1_unknown_step_and_missing_input_are_clear_errors(tmp_path) -> None:
    result = runner.invoke(app, ["recipe", "s1", "cook", "-w", str(tmp_path), "--model", "m"])
    assert result.exit_code == 1 and "unknown step 'cook'" in result.output
    result = runner.invoke(app, ["recipe", "s1", "curate", "-w", str(tmp_path), "--model", "m"])
    assert result.exit_code == 1 and "run collect first" in result.output
    result = runner.invoke(app, ["recipe", "s1", "evaluate", "-w", str(tmp_path), "--model", "m", "--budgets", "x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_rl_command_runs_and_reports(service, tiny_model, tmp_path) -> None:
    args = ["recipe", "rl", "--log-dir", str(tmp_path / "run"), "--model", str(tiny_model), "--base-url",
            service.url, "--api-key", service.api_key, "--env", "tests.recipes.plugin_env:make", "--steps", "1",
            "--prompts-per-step", "1", "--group-size", "2", "--max-tokens", "4", "--loss", "ppo"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "reward" in result.output and (tmp_path / "run" / METRICS_FILE).is_file()
    result = runner.invoke(app, [*args[:-2], "--loss", "sft"])
    assert result.exit_code == 1 and "importance_sampling or ppo" in result.output
