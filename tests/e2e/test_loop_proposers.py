"""Short loops with the llm proposer (against a scripted OpenAI-compatible server) and the tune proposer."""

from __future__ import annotations

import json

import pytest

from nightlab.config import load_config
from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.proposers import resolve_kind
from tests.fakes import Reply, ScriptedOpenAI
from tests.research.loop_workspace import git, make_workspace


def _answer(description: str, path: str, old: str, new: str) -> Reply:
    text = f"DESCRIPTION: {description}\nRATIONALE: test\n\n{path}\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"
    return Reply(text, prompt_tokens=100, completion_tokens=0)


def _rows(root):
    journal = Journal.for_workspace(root)
    rows = [r for r in journal.experiments(1) if r["kind"] == "candidate"]
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
        root = make_workspace(tmp_path, config={
            "proposer": {"kind": "auto"},
            "proposer.llm": {"base_url": server.base_url, "model": "scripted", "max_retries": 0,
                             "input_price_per_mtok": 1000.0},
            "experiment": {"heldout": None},
        })
        assert resolve_kind(load_config(root)) == "llm"
        state = ResearchLoop(root, RunOptions(tag="llm", max_cost=0.25)).run_loop()
        prompts = [r["messages"][-1]["content"] for r in server.requests]
    assert len(prompts) == 2 and "quadratic: a toy research problem" in prompts[0]  # program.md is sent
    assert "lower the LR" in prompts[1]  # ... and so is the history
    assert state.stop_reason.startswith("the next proposal could exceed --max-cost $0.25")
    rows = _rows(root)
    assert [(r["description"], r["decision"], r["proposer"]) for r in rows] == [
        ("lower the LR", "keep", "llm"), ("quieter evaluation", "invalid", "llm")
    ]
    assert all(r["prompt_tokens"] == 100 and r["cost_usd"] == pytest.approx(0.1) for r in rows)
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
        assert r["proposer"] == "tune" and r["decision"] in {"keep", "discard"}
        assert set(json.loads(r["params_json"])) <= {"LEARNING_RATE", "WIDTH", "MOMENTUM"}
        assert r["description"].startswith("tune: ")
    kept = [r for r in rows if r["decision"] == "keep"]
    assert git(root, "rev-parse", "HEAD") == (kept[-1]["commit_sha"] if kept else git(root, "rev-parse", "main"))
