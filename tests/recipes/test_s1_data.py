"""s1 collect and curate: a scripted teacher over real HTTP and the offline builtin teacher (no service
needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nightlab.recipes.common.problems import PROBLEM_TYPES, check_answer, generate_problems
from nightlab.recipes.s1 import (
    BROKEN,
    COLLECTED,
    CURATED,
    S1Config,
    S1Error,
    balance,
    collect,
    curate,
    read_jsonl,
    split_trace,
)
from tests.fakes import Reply, ScriptedOpenAI

PROBLEMS = {p.question: p for p in generate_problems(24, seed=0)}


def teacher(body: dict) -> str:
    """Right answers in the asked format, except: every 4th question broken format, every 6th a wrong
    answer."""
    p = PROBLEMS[body["messages"][-1]["content"]]
    index = int(p.id.rsplit("-", 1)[1])
    if index % 4 == 3:
        return f"The answer is {p.answer}."
    answer = p.answer + 1 if index % 6 == 5 else p.answer
    return f"<think>\nworking it out {'step ' * (index % 5 + 1)}\n</think>\nThe answer is {answer}."


def config(tmp_path: Path, url: str = "", **kw) -> S1Config:
    return S1Config(
        tmp_path, teacher_base_url=url, teacher_model="teach", teacher_api_key="k", num_questions=24, **kw
    )


def test_split_trace_accepts_inline_and_separate_reasoning() -> None:
    assert split_trace("<think>a b</think>The answer is 3.") == ("a b", "The answer is 3.")
    assert split_trace("a b\n</think>\nThe answer is 3.") == ("a b", "The answer is 3.")
    assert split_trace("The answer is 3.", reasoning="a b") == ("a b", "The answer is 3.")
    assert split_trace("The answer is 3.") is None
    assert split_trace("<think></think>The answer is 3.") is None


def test_collect_is_resumable_and_keeps_rows_when_the_teacher_fails(tmp_path: Path) -> None:
    replies = [teacher] * 10 + [Reply("overloaded", status=500)] * 3
    with ScriptedOpenAI(replies=replies) as server:
        with pytest.raises(S1Error, match="10 traces are saved.*run collect again"):
            collect(config(tmp_path, server.base_url))
        assert server.headers[0]["authorization"] == "Bearer k"
        assert server.requests[0]["messages"][0]["role"] == "system"
    assert len(read_jsonl(tmp_path / COLLECTED)) == 10
    with ScriptedOpenAI(default=teacher) as server:
        collect(config(tmp_path, server.base_url))
        assert len(server.requests) == 14  # only the questions not yet collected
        collect(config(tmp_path, server.base_url))
        assert len(server.requests) == 14
    rows = read_jsonl(tmp_path / COLLECTED)
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in PROBLEMS.values())
    assert all(r["teacher"] == "teach" and r["answer"] == PROBLEMS[r["question"]].answer for r in rows)


def test_a_torn_last_line_is_ignored_but_a_bad_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2')
    assert read_jsonl(path) == [{"a": 1}]
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(S1Error, match="x.jsonl:2"):
        read_jsonl(path)


def test_curate_reports_each_filter_and_balances_types(tmp_path: Path, capsys) -> None:
    with ScriptedOpenAI(default=teacher) as server:
        collect(config(tmp_path, server.base_url))
    report = curate(config(tmp_path, size=12, difficulty_samples=0))
    assert report is not None
    broken = sum(int(p.id.rsplit("-", 1)[1]) % 4 == 3 for p in PROBLEMS.values())
    wrong = sum(
        int(p.id.rsplit("-", 1)[1]) % 4 != 3 and int(p.id.rsplit("-", 1)[1]) % 6 == 5
        for p in PROBLEMS.values()
    )
    assert report.collected == 24
    assert list(report.removed.values()) == [broken, wrong, 24 - broken - wrong - 12]
    curated = read_jsonl(tmp_path / CURATED)
    assert len(curated) == 12 and set(curated[0]) == {"id", "type", "question", "answer", "thinking"}
    counts = sorted(report.kept_by_type.values())
    assert counts[-1] - counts[0] <= 1, report.kept_by_type  # balanced across types
    assert "format broken" in capsys.readouterr().err
    assert curate(config(tmp_path, size=5, difficulty_samples=0)) is None  # done: the output is kept
    assert len(read_jsonl(tmp_path / CURATED)) == 12


def test_curate_without_collected_traces_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(S1Error, match="run collect first"):
        curate(config(tmp_path))


def test_balance_prefers_long_thinking_within_a_type() -> None:
    rows = [{"type": t, "thinking": "x" * n, "id": f"{t}{n}"} for t in "ab" for n in (1, 5, 3)] + [
        {"type": "c", "thinking": "x", "id": "c1"}
    ]
    picked = balance(rows, 4, seed=0)
    assert [r["id"] for r in picked] == ["a5", "b5", "c1", "a3"]
    assert json.dumps(balance(rows, 100, 0)).count('"id"') == 7


def test_curate_that_would_keep_nothing_names_the_filter_and_writes_nothing(tmp_path: Path) -> None:
    with ScriptedOpenAI(default="The answer is 3.") as server:  # never thinks between the delimiters
        collect(config(tmp_path, server.base_url))
    with pytest.raises(S1Error, match=re.escape(f"'{BROKEN}' removed 24 of 24") + ".*--teacher builtin"):
        curate(config(tmp_path, difficulty_samples=0))
    assert not (tmp_path / CURATED).exists()


STEP = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)")


def test_builtin_worked_solutions_are_correct_step_by_step() -> None:
    problems = generate_problems(600, seed=5)
    assert {p.type for p in problems} == set(PROBLEM_TYPES)
    for p in problems:
        lines = p.solution.splitlines()
        steps = [STEP.search(line) for line in lines]
        assert sum(m is not None for m in steps) >= 1, p
        for m in filter(None, steps):
            a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
            assert {"+": a + b, "-": a - b, "*": a * b}[op] == result, (p.question, m[0])
        assert lines[-1] == f"So the answer is {p.answer}."


def test_collect_with_the_builtin_teacher_runs_offline(tmp_path: Path) -> None:
    cfg = S1Config(tmp_path, teacher="builtin", num_questions=12, seed=3, difficulty_samples=0)
    collect(cfg)
    rows = read_jsonl(tmp_path / COLLECTED)
    assert [r["id"] for r in rows] == [p.id for p in generate_problems(12, seed=3)]
    assert {r["teacher"] for r in rows} == {"builtin"}
    for row in rows:
        thinking, final = split_trace(row["content"])
        assert check_answer(final, row["answer"]) and "=" in thinking
    report = curate(cfg)
    assert report is not None and sum(report.removed.values()) == 0


def test_the_builtin_teacher_needs_worked_solutions(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is 2 + 2?", "answer": 4}) + "\n")
    with pytest.raises(S1Error, match="no worked solution.*--teacher api"):
        collect(S1Config(tmp_path, teacher="builtin", questions=questions))
    with pytest.raises(S1Error, match="needs --teacher-base-url"):
        collect(S1Config(tmp_path, questions=questions))
