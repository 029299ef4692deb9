"""The s1 pipeline end to end on the tiny model: scripted teacher, real service, official clients."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab.recipes.common.chat_format import ANSWER_PREFIX, THINK_CLOSE
from nightlab.recipes.common.problems import generate_problems
from nightlab.recipes.s1 import (
    BASE_CHECKS,
    EVAL_LOG,
    SCALING_MD,
    SCALING_PNG,
    TRAIN_LOG,
    S1Config,
    S1Error,
    collect,
    curate,
    evaluate,
    read_jsonl,
    run_all,
    train,
)
from tests.fakes import ScriptedOpenAI

ANSWERS = {p.question: p.answer for p in generate_problems(12, seed=0)}


def teacher(body: dict) -> str:
    answer = ANSWERS[body["messages"][-1]["content"]]
    return f"<think>\nlet me work it out. the result is {answer}.\n</think>\nThe answer is {answer}."


def config(workdir: Path, service, model: Path, teacher_url: str) -> S1Config:
    return S1Config(
        workdir,
        base_url=service.url,
        model=str(model),
        api_key=service.api_key,
        teacher_base_url=teacher_url,
        teacher_model="teacher",
        num_questions=12,
        size=8,
        difficulty_samples=2,
        difficulty_max_tokens=12,
        epochs=2,
        batch_size=4,
        learning_rate=1e-2,
        lora_rank=4,
        num_eval_questions=6,
        budgets=[4, 12],
        answer_tokens=12,
    )


def test_pipeline_runs_end_to_end_and_every_step_resumes(service, tiny_model, tmp_path) -> None:
    with ScriptedOpenAI(default=teacher) as server:
        cfg = config(tmp_path, service, tiny_model, server.base_url)
        summary = run_all(cfg)
        assert len(server.requests) == 12
        # a random model never answers right: the difficulty filter keeps every verified question
        assert [r["correct"] for r in read_jsonl(tmp_path / BASE_CHECKS)] == [0] * 12
        log = read_jsonl(tmp_path / TRAIN_LOG)
        assert [r["event"] for r in log].count("step") == 4 and log[-1]["event"] == "done"
        assert log[-1]["sampler_path"].startswith("tinker://")
        assert {(s["budget"], s["mode"]) for s in summary} == {
            (b, m) for b in (4, 12) for m in ("no forcing", "budget forcing")
        }
        rows = read_jsonl(tmp_path / EVAL_LOG)
        assert len(rows) == 4 * 6 and {r["model"] for r in rows} == {log[-1]["sampler_path"]}
        forced = [r for r in rows if r["mode"] == "budget forcing"]
        # at the budget the sampler closes thinking and writes the answer prefix
        assert all(THINK_CLOSE + ANSWER_PREFIX.rstrip() in r["text"] for r in forced)
        assert (tmp_path / SCALING_PNG).stat().st_size > 0
        assert "| 12 | budget forcing |" in (tmp_path / SCALING_MD).read_text()

        run_all(cfg)  # everything is done: no teacher calls, no new training or evaluation rows
        assert len(server.requests) == 12
        assert read_jsonl(tmp_path / TRAIN_LOG) == log and len(read_jsonl(tmp_path / EVAL_LOG)) == 24


def test_training_resumes_from_the_last_saved_epoch(service, tiny_model, tmp_path) -> None:
    cfg = config(tmp_path, service, tiny_model, "")
    cfg.teacher, cfg.difficulty_samples, cfg.epochs = "builtin", 0, 1  # offline: worked solutions as traces
    collect(cfg)
    curate(cfg)
    train(cfg)
    first = read_jsonl(tmp_path / TRAIN_LOG)
    (tmp_path / TRAIN_LOG).write_text(
        "".join(line + "\n" for line in (tmp_path / TRAIN_LOG).read_text().splitlines()[:-1])
    )
    cfg.epochs = 2
    path = train(cfg)
    log = read_jsonl(tmp_path / TRAIN_LOG)
    assert [r["epoch"] for r in log if r["event"] == "step"] == [0, 0, 1, 1]
    assert log[-1] == {"event": "done", "sampler_path": path} and path != first[-1]["sampler_path"]
    assert evaluate(cfg, model=str(tiny_model))[0]["n"] == 6  # the base model, by name, evaluates too


def test_a_failed_training_closes_its_session_as_errored(service, tiny_model, tmp_path) -> None:
    cfg = config(tmp_path, service, tiny_model, "")
    cfg.teacher, cfg.difficulty_samples, cfg.max_length = "builtin", 0, 2
    collect(cfg)
    curate(cfg)
    before = len(service.session_outcomes())
    with pytest.raises(S1Error, match="longer than max_length=2"):
        train(cfg)
    assert service.session_outcomes()[before:] == ["errored"]
