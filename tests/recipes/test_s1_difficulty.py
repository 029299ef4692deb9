"""s1's difficulty filter against a scripted base model over real HTTP: it is credited for what it knows.

A base model never closes its thinking by itself, so the filter must force the answer (budget forcing) to
grade it at all. The scripted sampler plays exactly that model; the tokenizer the recipe would fetch through
the tinker client is the tiny model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab.recipes import s1
from nightlab.recipes.common.chat_format import ANSWER_PREFIX, THINK_CLOSE
from nightlab.recipes.common.problems import generate_problems
from nightlab.recipes.s1 import BASE_CHECKS, CURATED, EASY, S1Config, S1Error, collect, curate, read_jsonl
from tests.recipes.scripted_sampler import ScriptedSampler

PROBLEMS = generate_problems(12, seed=0)


def base_model(known_types: set[str]):
    """Thinks aloud without closing; the answer it commits to when forced is right only for `known_types`."""
    by_question = {p.question: p for p in PROBLEMS}

    def think(question: str) -> tuple[str, int]:
        p = by_question[question]
        return f"hmm, {question} is about {p.answer} i think", p.answer + (0 if p.type in known_types else 7)

    return think


def config(tmp_path: Path, url: str) -> S1Config:
    return S1Config(
        tmp_path,
        base_url=url,
        model="base",
        teacher="builtin",
        num_questions=len(PROBLEMS),
        difficulty_samples=2,
        difficulty_max_tokens=40,
        answer_tokens=8,
    )


@pytest.fixture
def scripted(tokenizer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(s1, "service_tokenizer", lambda cfg: tokenizer)

    def serve(known_types: set[str]):
        return ScriptedSampler(tokenizer, [p.question for p in PROBLEMS], base_model(known_types)).serving()

    return serve


def test_questions_the_base_model_answers_right_are_removed(tmp_path: Path, scripted) -> None:
    known = {"addition", "word_age"}
    with scripted(known) as sampler:
        cfg = config(tmp_path, sampler.url)
        collect(cfg)
        report = curate(cfg)
    assert report is not None
    easy = [p.id for p in PROBLEMS if p.type in known]
    assert report.removed[EASY] == len(easy) == 4
    assert {r["id"] for r in read_jsonl(tmp_path / CURATED)} == {p.id for p in PROBLEMS} - set(easy)
    checks = {r["id"]: r["correct"] for r in read_jsonl(tmp_path / BASE_CHECKS)}
    assert checks == {p.id: 2 if p.id in easy else 0 for p in PROBLEMS}
    for request in sampler.requests:  # thinking cut at the budget, then the answer line forced
        assert request["budget_forcing"]["max_thinking_tokens"] == 40
        assert request["budget_forcing"]["end_thinking"] == THINK_CLOSE
        assert request["budget_forcing"]["answer_prefix"] == ANSWER_PREFIX
        assert request["max_tokens"] == 40 + 8 and request["n"] == 2


def test_when_every_question_is_too_easy_curate_names_the_filter_and_writes_nothing(
    tmp_path: Path, scripted
) -> None:
    with scripted({p.type for p in PROBLEMS}) as sampler:
        cfg = config(tmp_path, sampler.url)
        collect(cfg)
        for _ in range(2):  # nothing written, so a second try fails the same way instead of "already done"
            with pytest.raises(S1Error, match=f"'{EASY}' removed 12 of 12.*--difficulty-samples 0"):
                curate(cfg)
            assert not (tmp_path / CURATED).exists()
