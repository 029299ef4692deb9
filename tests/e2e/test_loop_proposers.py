"""Short loops with the llm proposer (against a scripted OpenAI-compatible server) and the tune proposer."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.config import load_config
from nightlab.research import loop
from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.proposers import llm, resolve_kind
from tests.fakes import Reply, ScriptedOpenAI
from tests.research.loop_workspace import git, make_workspace


def _answer(description: str, path: str, old: str, new: str) -> Reply:
    text = (
        f"DESCRIPTION: {description}\nRATIONALE: test\n\n"
        f"{path}\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"
    )
    return Reply(text, prompt_tokens=100, completion_tokens=0)


def _rows(root):
    journal = Journal.for_workspace(root)
    rows = [r for r in journal.experiments(1) if r.kind == "candidate"]
    journal.close()
    return rows


def test_llm_loop_records_usage_and_stops_at_the_cost_cap(tmp_path, monkeypatch):
    monkeypatch.delenv("NIGHTLAB_LLM_MODEL", raising=False)
    replies = [
        _answer("lower the LR", "train.py", "LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05"),
        _answer("quieter evaluation", "evaluate.py", "NOISE = 0.01", "NOISE = 0.0"),
        _answer("never reached", "train.py", "WIDTH = 4", "WIDTH = 16"),
    ]
    with ScriptedOpenAI(replies=replies) as server:
        root = make_workspace(
            tmp_path,
            config={
                "proposer": {"kind": "auto"},
                "proposer.llm": {
                    "base_url": server.base_url,
                    "model": "scripted",
                    "max_retries": 0,
                    "input_price_per_mtok": 1000.0,
                },
                "experiment": {"heldout": None},
            },
        )
        assert resolve_kind(load_config(root)) == "llm"
        state = ResearchLoop(root, RunOptions(tag="llm", max_cost=0.25)).run_loop()
        prompts = [r["messages"][-1]["content"] for r in server.requests]
    assert len(prompts) == 2 and "quadratic: a toy research problem" in prompts[0]  # program.md is sent
    assert "lower the LR" in prompts[1]  # ... and so is the history
    assert state.stop_reason.startswith("the next proposal could exceed --max-cost $0.25")
    rows = _rows(root)
    assert [(r.description, r.decision, r.proposer) for r in rows] == [
        ("lower the LR", "keep", "llm"),
        ("quieter evaluation", "invalid", "llm"),
    ]
    assert all(r.prompt_tokens == 100 and r.cost_usd == pytest.approx(0.1) for r in rows)
    assert state.cost_usd == pytest.approx(0.2)
    assert "LEARNING_RATE = 0.05" in (root / "train.py").read_text()


def test_tune_loop(tmp_path, monkeypatch):
    monkeypatch.delenv("NIGHTLAB_LLM_MODEL", raising=False)
    root = make_workspace(tmp_path, config={"experiment": {"heldout": None}})
    assert resolve_kind(load_config(root)) == "tune"
    state = ResearchLoop(root, RunOptions(tag="tune", max_experiments=4)).run_loop()
    rows = _rows(root)
    assert len(rows) == 4 and state.stop_reason == "reached --max-experiments 4"
    for r in rows:
        assert r.proposer == "tune" and r.decision in {"keep", "discard"}
        assert set(r.params) <= {"LEARNING_RATE", "WIDTH", "MOMENTUM"}
        assert r.description.startswith("tune: ")
    kept = [r for r in rows if r.decision == "keep"]
    assert git(root, "rev-parse", "HEAD") == (kept[-1].commit_sha if kept else git(root, "rev-parse", "main"))


DOWN = Reply("the model is overloaded", status=503)


@pytest.fixture
def impatient(monkeypatch):
    """No client-side retries, and short waits between the loop's own tries."""
    monkeypatch.delenv("NIGHTLAB_LLM_MODEL", raising=False)
    monkeypatch.setattr(llm, "_TRANSPORT_RETRIES", 0)
    monkeypatch.setattr(loop, "OUTAGE_BACKOFF_SECONDS", (0.05, 0.2))


def _llm_workspace(tmp_path, server, outage_seconds):
    return make_workspace(
        tmp_path,
        config={
            "proposer": {"kind": "llm", "outage_seconds": outage_seconds},
            "proposer.llm": {"base_url": server.base_url, "model": "scripted", "max_retries": 0},
            "experiment": {"heldout": None},
        },
    )


def test_an_llm_outage_is_waited_out(tmp_path, impatient):
    answer = _answer("lower the LR", "train.py", "LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05")
    with ScriptedOpenAI(replies=[DOWN, DOWN, DOWN, answer]) as server:
        root = _llm_workspace(tmp_path, server, outage_seconds=60)
        state = ResearchLoop(root, RunOptions(tag="outage", max_experiments=1)).run_loop()
        asked = len(server.requests)
    assert asked == 4 and state.stop_reason == "reached --max-experiments 1"
    assert [(r.description, r.decision) for r in _rows(root)] == [("lower the LR", "keep")]


def test_an_llm_outage_that_lasts_stops_the_run_cleanly(tmp_path, impatient):
    with ScriptedOpenAI(default=DOWN) as server:
        root = _llm_workspace(tmp_path, server, outage_seconds=0.5)
        result = CliRunner().invoke(app, ["run", "-C", str(root), "--tag", "outage"])
        asked = len(server.requests)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "the proposer is unavailable (LLM request to" in said and asked >= 2
    assert (
        "stopped: the proposer stayed unavailable for 0.5s (proposer.outage_seconds): LLM request to" in said
    )
    assert "Error code: 503" in said and _rows(root) == []
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""


def test_llm_briefs_stay_within_the_memory_budget_as_the_run_grows(tmp_path, monkeypatch):
    """Twelve proposals, each to widen by one: the memory in every brief stays within `memory_tokens` by the
    tokenizer that counts it, and still names every experiment's count and the kept path."""
    from nightlab.research.memory import token_counter

    monkeypatch.delenv("NIGHTLAB_LLM_MODEL", raising=False)

    def widen(body: dict) -> Reply:
        width = int(body["messages"][-1]["content"].split("WIDTH = ")[1].split()[0])
        return _answer(f"width {width + 1}", "train.py", f"WIDTH = {width}", f"WIDTH = {width + 1}")

    with ScriptedOpenAI(default=widen) as server:
        root = make_workspace(
            tmp_path,
            config={
                "proposer": {"kind": "llm", "memory_tokens": 300},
                "proposer.llm": {"base_url": server.base_url, "model": "scripted", "max_retries": 0},
                "experiment": {"heldout": None},
            },
        )
        ResearchLoop(root, RunOptions(tag="mem", max_experiments=12)).run_loop()
        briefs = [r["messages"][-1]["content"] for r in server.requests]
    count = token_counter(None)
    after = [b.split("# Experiments so far\n", 1)[1] for b in briefs]
    memories = [re.split(r"\n\n(?:# |Propose the next experiment)", a, maxsplit=1)[0] for a in after]
    assert len(memories) == 12 and all(count(m) <= 300 for m in memories)
    assert memories[-1].startswith("11 experiments") and "Path to the best" in memories[-1]
    assert count(memories[-1]) > count(memories[1])  # it fills up to the budget as the run grows
