"""The research commands as a user types them: init, run, status, report, and their error messages."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nightlab.cli import app
from tests.research.loop_workspace import commit_all, git, make_workspace, replace_block

runner = CliRunner()


def test_init_refuses_unknown_template_and_non_empty_dir(tmp_path):
    result = runner.invoke(app, ["init", "--template", "nope", str(tmp_path / "a")])
    assert result.exit_code == 1 and "unknown template 'nope'; available:" in result.output
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    result = runner.invoke(app, ["init", "--template", "quadratic", str(tmp_path / "b")])
    assert result.exit_code == 1 and "not empty" in result.output


def test_config_errors_name_the_key(tmp_path):
    root = make_workspace(tmp_path)
    text = (root / "nightlab.toml").read_text()
    (root / "nightlab.toml").write_text(text.replace("budget_seconds = 5", "budget_seconds = -1"))
    commit_all(root, "bad budget")
    result = runner.invoke(app, ["run", "-C", str(root)])
    assert result.exit_code == 1 and "experiment.budget_seconds" in result.output
    (root / "nightlab.toml").write_text(text.replace('name = "loss"', 'nmae = "loss"'))
    commit_all(root, "typo")
    result = runner.invoke(app, ["run", "-C", str(root)])
    assert result.exit_code == 1 and "metric.nmae" in result.output and "metric.name" in result.output


def test_dirty_tree_is_refused(tmp_path):
    root = make_workspace(tmp_path, patches={"1.md": replace_block("WIDTH = 4", "WIDTH = 8")})
    (root / "train.py").write_text((root / "train.py").read_text() + "\n# my edit\n")
    result = runner.invoke(app, ["run", "-C", str(root), "--proposer", "replay"])
    assert result.exit_code == 1 and "uncommitted changes" in result.output and "train.py" in result.output
    assert "# my edit" in (root / "train.py").read_text()


def test_run_status_report(tmp_path):
    root = make_workspace(
        tmp_path,
        patches={"1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05")},
        config={"decide": {"baseline_runs": 2}},
    )
    result = runner.invoke(app, ["run", "-C", str(root), "--tag", "cli", "--proposer", "replay"])
    assert result.exit_code == 0, result.output
    assert "#3 keep" in result.output and "stopped: the proposer has nothing more to try" in result.output
    result = runner.invoke(app, ["status", "-C", str(root)])
    assert result.exit_code == 0 and "1 experiments, 1 kept" in result.output
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", "-C", str(root), "--final", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"report.md", "progress.png", "results.tsv"}

    # The same run as one document, for an agent: what the table shows, and what a proposer sees.
    result = runner.invoke(app, ["status", "-C", str(root), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["schema"] == "nightlab.run/1" and doc["run"]["tag"] == "cli" and doc["run"]["metric"] == "loss"
    rows = doc["experiments"]
    assert [(r["number"], r["kind"], r["decision"]) for r in rows] == [
        (1, "baseline", "keep"),
        (2, "baseline", "keep"),
        (3, "candidate", "keep"),
    ]
    assert "LEARNING_RATE = 0.05" in rows[2]["diff"] and rows[2]["metric_runs"]
    assert doc["best"]["commit"] == rows[2]["commit_sha"] and doc["best"]["metric"] == rows[2]["metric"]
    assert doc["noise"] > 0 and doc["counts"]["kept"] == 1 and doc["counts"]["since_last_keep"] == 0
    assert doc["plateau"]["now"] is False and {h["label"] for h in doc["heldout"]} == {"baseline", "best"}
    result = runner.invoke(app, ["report", "-C", str(root), "--json", "--out", str(out)])
    assert result.exit_code == 0 and "report.json" in result.output
    assert json.loads((out / "report.json").read_text()) == doc


def _refused(root, *args: str) -> str:
    """Run `nightlab run` expecting a one-line error before anything ran; return the output."""
    result = runner.invoke(app, ["run", "-C", str(root), *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and result.output.startswith("error: ")
    assert (
        git(root, "rev-parse", "--abbrev-ref", "HEAD") == "main"
        and not (root / ".nightlab" / "logs").exists()
    )
    return " ".join(result.output.split())


def test_unknown_proposers_and_knobs_are_config_errors(tmp_path):
    root = make_workspace(
        tmp_path / "a", config={"proposer.tune": {"knobs": {"NOPE": {"low": 1, "high": 2}}}}
    )
    assert (
        "unknown proposer 'nope' (--proposer or proposer.kind in nightlab.toml); choose one of auto"
        in _refused(root, "--proposer", "nope")
    )
    assert "[proposer.tune.knobs] names ['NOPE']" in _refused(root, "--proposer", "tune")
    knobless = make_workspace(
        tmp_path / "b",
        config={"proposer.tune": {"knobs": None}},
        files={"train.py": "print('no constants here')\n"},
    )
    said = _refused(knobless, "--proposer", "tune")
    assert "the tune proposer found nothing to tune" in said and "list knobs in [proposer.tune.knobs]" in said


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("loss: ([0-9.]+", "metric.pattern: Value error, not a valid regular expression"),
        ("(loss): ([0-9.]+)", "metric.pattern: Value error, has 2 groups; use one group around the number"),
    ],
)
def test_a_bad_metric_pattern_is_refused_naming_the_key(tmp_path, pattern, words):
    root = make_workspace(tmp_path, config={"metric": {"channel": "log", "pattern": pattern}})
    assert words in _refused(root, "--proposer", "replay")


def test_one_baseline_run_is_refused_naming_the_key(tmp_path):
    root = make_workspace(tmp_path, config={"decide": {"baseline_runs": 1}})
    said = _refused(root, "--proposer", "replay")
    assert (
        "decide.baseline_runs: Value error, must be at least 2, got 1: the noise floor is the spread" in said
    )


def test_a_cost_cap_without_prices_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("NIGHTLAB_LLM_MODEL", raising=False)
    root = make_workspace(
        tmp_path, config={"proposer.llm": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    )
    said = _refused(root, "--proposer", "llm", "--max-cost", "1")
    assert (
        "--max-cost needs the model's prices to count what the run spends: set "
        "proposer.llm.input_price_per_mtok and proposer.llm.output_price_per_mtok"
    ) in said


@pytest.mark.parametrize(("device", "budget"), [(None, 5.0), ("cuda", 7.0)])
def test_the_gpu_budget_applies_only_where_an_accelerator_is(tmp_path, monkeypatch, device, budget):
    from nightlab.research import execution, loop

    root = make_workspace(tmp_path, config={"experiment": {"budget_seconds": 5, "gpu_budget_seconds": 7}})
    # The hardware probe, the one thing we cannot vary.
    monkeypatch.setattr(execution, "accelerator", lambda: device)
    assert loop.ResearchLoop(root).config.experiment.budget_seconds == budget
    assert loop.ResearchLoop(root, loop.RunOptions(budget=3)).config.experiment.budget_seconds == 3


def test_a_gpu_budget_beyond_the_timeout_is_refused(tmp_path):
    root = make_workspace(tmp_path, config={"experiment": {"gpu_budget_seconds": 9999}})
    assert "must be >= gpu_budget_seconds (9999" in _refused(root, "--proposer", "replay")
