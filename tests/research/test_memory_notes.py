"""Lessons for the memory's groups (`memory_notes = "llm"`), asked of a scripted server over real HTTP."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from nightlab.config import load_config
from nightlab.research.memory import failure_cause, render_memory, token_counter
from nightlab.research.memory_notes import LESSON_CHARS, NOTES_FILE, QUESTION, LessonWriter
from nightlab.research.proposers import llm
from nightlab.research.proposers.agent import AgentProposer, AgentSection
from nightlab.research.proposers.base import PastExperiment, ProposalContext
from nightlab.research.proposers.llm import LLMProposer, LLMSection
from tests.fakes import Reply, ScriptedOpenAI
from tests.research.loop_workspace import make_workspace
from tests.research.test_llm_proposer import GOOD, context

CAUSES = ["RuntimeError: CUDA out of memory (tried 8 GiB)", "ValueError: NaN loss at step 40"]
KNOBS = ["LR", "DEPTH", "WIDTH"]


@pytest.fixture(autouse=True)
def _no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NIGHTLAB_LLM_BASE_URL", "NIGHTLAB_LLM_MODEL", "NIGHTLAB_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def count():
    return token_counter(None)  # SmolLM2's tokenizer, from the offline model


def history(lr_tries: int = 3) -> list[PastExperiment]:
    """Five groups: two failure causes (two crashes each), three knobs tried again (LR `lr_tries` times)."""
    past = [PastExperiment(1, "baseline", "keep", 1.30)]
    for cause in CAUSES:
        for _ in range(2):
            past.append(PastExperiment(len(past) + 1, "deeper", "crash", None, reason=f"Traceback\n{cause}"))
    for knob in KNOBS:
        for i in range(lr_tries if knob == "LR" else 2):
            params = {knob: 0.01 * (i + 2)}
            past.append(PastExperiment(len(past) + 1, f"{knob} {i}", "discard", 1.4 + i / 100, params=params))
    return past


def is_lesson_request(body: dict[str, Any]) -> bool:
    return body["messages"][0]["content"].startswith(QUESTION)


def lesson_for(prompt: str) -> str:
    """The scripted lesson of a group: it names the group's head, size included ("3 changes to LR")."""
    group = prompt.split("The group:\n- ", 1)[1].split(":", 1)[0]
    return f"mind {group}"


def answer(body: dict[str, Any]) -> str | Reply:
    return lesson_for(body["messages"][0]["content"]) if is_lesson_request(body) else GOOD


def lessons_asked(server: ScriptedOpenAI) -> list[str]:
    return [lesson_for(r["messages"][0]["content"]) for r in server.requests if is_lesson_request(r)]


def proposer(server: ScriptedOpenAI, workspace: Path, **overrides: Any) -> LLMProposer:
    config = LLMSection(base_url=server.base_url, model="test-model", tools=False, **overrides)
    return LLMProposer(config, workspace=workspace, memory_notes="llm")


def brief(server: ScriptedOpenAI) -> str:
    """The memory in the last proposal's prompt."""
    prompts = [r["messages"][1]["content"] for r in server.requests if not is_lesson_request(r)]
    return prompts[-1].split("# Experiments so far\n", 1)[1].split("\n\n# ", 1)[0]


def propose(server: ScriptedOpenAI, llm_proposer: LLMProposer, past: list[PastExperiment]) -> str:
    assert llm_proposer.propose(context(history=past)).description == "double the learning rate"
    return brief(server)


def test_the_groups_get_their_lessons_in_the_prompt_and_each_is_asked_once(tmp_path: Path) -> None:
    past = history()[:6]  # the two failure groups and LR tried once: two groups
    with ScriptedOpenAI(default=answer) as server:
        llm_proposer = proposer(server, tmp_path)
        usage = llm_proposer.propose(context(history=past)).usage
        first = brief(server)
        assert lessons_asked(server) == ["mind 2 x crash", "mind 2 x crash"]
        second = propose(server, llm_proposer, past)
    assert len(server.requests) == 4  # the second proposal asked no lesson
    assert first == second
    assert f"- 2 x crash: {CAUSES[0]} (#2, #3) — lesson: mind 2 x crash" in first
    assert f"- 2 x crash: {CAUSES[1]} (#4, #5) — lesson: mind 2 x crash" in first
    # the first proposal's usage counts its two lessons and its answer
    assert usage.completion_tokens == sum(r["usage"]["completion_tokens"] for r in server.responses[:3])


def test_at_most_three_new_lessons_a_render_and_a_grown_group_gets_a_new_one(tmp_path: Path) -> None:
    with ScriptedOpenAI(default=answer) as server:
        llm_proposer = proposer(server, tmp_path)
        first = propose(server, llm_proposer, history())
        assert len(lessons_asked(server)) == 3 and first.count("— lesson: ") == 3
        second = propose(server, llm_proposer, history())
        assert len(lessons_asked(server)) == 5 and second.count("— lesson: ") == 5
        assert "best 1.4 (#6) (#6, #7, #8) — lesson: mind 3 changes to LR" in second
        grown = propose(server, llm_proposer, history(lr_tries=4))
    assert lessons_asked(server)[5:] == ["mind 4 changes to LR"]
    assert "(#6, #7, #8, #9) — lesson: mind 4 changes to LR" in grown
    assert grown.count("— lesson: ") == 5


def test_a_group_past_the_limit_keeps_its_last_lesson_until_it_gets_a_new_one(count) -> None:
    asked: list[str] = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return lesson_for(prompt)

    notes = LessonWriter(ask)
    render_memory(history(), "minimize", "val_bpb", 4000, count, notes)
    render_memory(history(), "minimize", "val_bpb", 4000, count, notes)
    # four groups grow at once: three get new lessons, the fourth keeps its old one for this render
    past = history(lr_tries=3) + [
        PastExperiment(13 + i, "again", "discard", 1.5, params={knob: 0.5}) for i, knob in enumerate(KNOBS)
    ]
    past.append(PastExperiment(16, "deeper", "crash", None, reason=f"Traceback\n{CAUSES[0]}"))
    text = render_memory(past, "minimize", "val_bpb", 4000, count, notes)
    assert len(asked) == 8 and text.count("— lesson: ") == 5
    assert "(#11, #12, #15) — lesson: mind 2 changes to WIDTH" in text  # grown, not asked again yet
    again = render_memory(past, "minimize", "val_bpb", 4000, count, notes)
    assert len(asked) == 9 and "(#11, #12, #15) — lesson: mind 3 changes to WIDTH" in again


@pytest.mark.parametrize("budget", [200, 300, 600, 2000])
def test_the_memory_with_long_lessons_never_exceeds_its_budget(count, budget: int) -> None:
    notes = LessonWriter(lambda prompt: "stay below\x1b[2J 3e-3\n## Injected heading " + "word " * 400)
    past = history(lr_tries=30)
    for _ in range(3):  # asking, then all cached
        text = render_memory(past, "minimize", "val_bpb", budget, count, notes)
        assert count(text) <= budget
    lessons = [line.split(" — lesson: ", 1)[1] for line in text.splitlines() if " — lesson: " in line]
    if budget >= 2000:
        assert lessons
    for lesson in lessons:
        assert lesson.startswith("stay below 3e-3 ## Injected heading word") and len(lesson) <= LESSON_CHARS
    assert "\x1b" not in text and "\n## Injected" not in text


def test_a_failing_lesson_request_leaves_the_proposal_working_without_lessons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(llm, "_TRANSPORT_RETRIES", 0)

    def failing(body: dict[str, Any]) -> str | Reply:
        return Reply("overloaded", status=500) if is_lesson_request(body) else GOOD

    with ScriptedOpenAI(default=failing) as server, caplog.at_level(logging.WARNING):
        llm_proposer = proposer(server, tmp_path)
        first = propose(server, llm_proposer, history())
        second = propose(server, llm_proposer, history())
    assert len(lessons_asked(server)) == 2  # one try a render: a failing endpoint is not asked again
    assert "— lesson:" not in first + second and "- 3 changes to LR: 3 discard" in first
    warnings = [r for r in caplog.records if "lesson request failed" in r.getMessage()]
    assert len(warnings) == 1
    assert not (tmp_path / ".nightlab" / NOTES_FILE).exists()


def test_the_lessons_survive_a_new_proposer_in_the_workspace(tmp_path: Path) -> None:
    past = history()[:6]
    with ScriptedOpenAI(default=answer) as server:
        first = propose(server, proposer(server, tmp_path), past)
        second = propose(server, proposer(server, tmp_path), past)
    assert len(lessons_asked(server)) == 2 and first == second
    saved = json.loads((tmp_path / ".nightlab" / NOTES_FILE).read_text())
    entry = next(v for k, v in saved.items() if k.startswith(f"failure: {failure_cause(CAUSES[0])} @"))
    assert entry == {"size": 2, "lesson": "mind 2 x crash"}
    assert [p.name for p in (tmp_path / ".nightlab").iterdir()] == [NOTES_FILE]  # no temp file left


def test_the_agent_gets_lessons_from_the_configured_llm(tmp_path: Path) -> None:
    with ScriptedOpenAI(default=answer) as server:
        llm_section = {"base_url": server.base_url, "model": "test-model"}
        notes = {"kind": "agent", "memory_notes": "llm", "agent": {"command": f"cat > {tmp_path}/brief.md"}}
        root = make_workspace(tmp_path, config={"proposer": notes | {"llm": llm_section}})
        agent(root).propose(ProposalContext("p", {}, "val_bpb", "minimize", 1.3, 0.01, history()[:6]))
    assert "(#2, #3) — lesson: mind 2 x crash" in (tmp_path / "brief.md").read_text()
    assert agent(make_workspace(tmp_path / "other", config={"proposer": notes})).notes is None


def agent(root: Path) -> AgentProposer:
    config = load_config(root)
    settings = config.proposer.section("agent")
    assert isinstance(settings, AgentSection)
    return AgentProposer.from_config(settings, root, config)


def test_another_runs_group_of_the_same_idea_and_size_gets_its_own_lesson(count) -> None:
    asked: list[str] = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return f"lesson {len(asked)}"

    notes = LessonWriter(ask)
    first_run = [PastExperiment(i, f"LR {i}", "discard", 1.5, params={"LR": 0.1 * i}) for i in (1, 2)]
    later_run = [PastExperiment(i, f"LR to {i}", "discard", 1.5, params={"LR": 0.3 * i}) for i in (1, 2)]
    first = render_memory(first_run, "minimize", "val_bpb", 4000, count, notes)
    later = render_memory(later_run, "minimize", "val_bpb", 4000, count, notes)
    assert len(asked) == 2 and "lesson: lesson 1" in first and "lesson: lesson 2" in later
