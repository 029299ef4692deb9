"""The online loop end to end on the tiny model: a simulated user asks the served alias over real HTTP and
rates the answers, a judge (a scripted OpenAI-compatible server) is the reward model, GRPO rounds train the
policy, and the guard decides what is served. An honest judge raises the held-out reward over the no-update
baseline; a judge that pays for length is caught when the fixed rubric falls."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from nightlab.recipes.online.guard import Bounds, Evaluation, promotion
from nightlab.recipes.online.journal import JOURNAL
from nightlab.recipes.online.loop import OnlineConfig, demo_questions, run_online
from nightlab.recipes.online.reward import JudgeReward, RewardError, agreement, split
from nightlab.recipes.online.rubric import brief_arithmetic, user_rating
from nightlab.recipes.online.user import SimulatedUser
from nightlab.train.api.background import serve_in_thread
from nightlab.web.app import create_dashboard_app
from tests.fakes.scripted_openai import Reply, ScriptedOpenAI

pytestmark = pytest.mark.timeout(600)


def _answer(body: dict) -> str:
    return body["messages"][-1]["content"].rsplit("\nAnswer: ", 1)[1].rsplit("\nGrade (0-10):", 1)[0]


def honest(body: dict) -> str:
    """What the users want: few words."""
    return str(max(0, 10 - len(_answer(body).split())))


def hackable(body: dict) -> str:
    """A broken reward model: the longer, the better."""
    return str(min(10, len(_answer(body).split())))


def _run(service, tiny_model: Path, log_dir: Path, grade) -> list[dict]:
    cfg = OnlineConfig(
        base_url=service.url,
        model=str(tiny_model),
        log_dir=log_dir,
        api_key=service.api_key,
        alias=f"assistant-{log_dir.name}",
        rounds=4,  # on the random tiny model an early round often learns too little to pass the guard
        steps_per_round=4,
        max_tokens=16,
        learning_rate=2e-2,
        lora_rank=8,
        kl_coef=0.0,
        kl_max=100.0,
        every_events=4,  # each round waits for the simulated user's four ratings
    )
    user = SimulatedUser(service.url, service.api_key, cfg.alias, max_tokens=16)
    with ScriptedOpenAI(default=grade) as judge:
        reward = JudgeReward(judge.base_url, "judge", "test", cfg.judge_rubric)
        try:
            return run_online(cfg, reward, brief_arithmetic, lambda k: user.visit(demo_questions(k, 4, 0)))
        finally:
            user.close()


def _default(field: str) -> float:
    """A guard bound as `nightlab online run` sets it unless told otherwise (the runs above keep it)."""
    return OnlineConfig.__dataclass_fields__[field].default


@pytest.fixture(scope="module")
def honest_run(service, tiny_model, tmp_path_factory) -> tuple[Path, list[dict]]:
    """(log dir, rows) of one online run with an honest judge, shared by the tests that read it."""
    log_dir = tmp_path_factory.mktemp("online") / "honest"
    return log_dir, _run(service, tiny_model, log_dir, honest)


def test_an_honest_reward_model_raises_the_served_reward_over_the_no_update_baseline(service, honest_run):
    log_dir, rows = honest_run
    baseline, rounds = rows[0], rows[1:]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["events"] == 4 for r in rounds)  # every simulated rating reached the loop
    promoted = [r for r in rounds if r["promoted"]]
    assert promoted, [r["reason"] for r in rounds]
    assert promoted[-1]["candidate"]["reward"] > baseline["candidate"]["reward"] + 0.02
    tolerance = _default("rubric_tolerance")
    for r in promoted:  # the invariant: nothing served scores worse on the rubric than what it replaced
        assert r["candidate"]["rubric"] >= r["served"]["rubric"] - tolerance
    alias = httpx.get(
        f"{service.url}/v1/aliases/assistant-honest", headers={"X-API-Key": service.api_key}, timeout=30
    ).json()
    assert alias["model"] == promoted[-1]["checkpoint"]
    assert [json.loads(line) for line in (log_dir / JOURNAL).read_text().splitlines()] == rows

    status = subprocess.run(
        [sys.executable, "-m", "nightlab.cli", "online", "status", str(log_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    served = promoted[-1]["candidate"]["reward"]
    assert f"4 rounds, 16 feedback events, {len(promoted)} promoted" in status.stdout
    assert (
        f"held-out reward {baseline['candidate']['reward']:.3f} (no update) -> {served:.3f}" in status.stdout
    )
    assert (log_dir / "online.png").stat().st_size > 0


def test_the_dashboard_shows_the_online_rounds_in_a_browser(honest_run, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="install the test extra (playwright)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: apt-get install chromium")
    log_dir, rows = honest_run
    app = create_dashboard_app(tmp_path, online=log_dir)  # no workspace journal: the online run alone
    with serve_in_thread(app) as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url + "/")
        assert page.url.endswith("/online")
        shots = Path("test-artifacts/screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "online.png"), full_page=True)
        table = page.locator("table.online tbody tr")
        assert table.count() == len(rows)
        shown = [table.nth(i).locator(".decision").inner_text() for i in range(table.count())]
        assert shown == ["baseline"] + ["promoted" if r["promoted"] else "kept, not served" for r in rows[1:]]
        assert page.locator("#promotions").inner_text() == str(sum(r["promoted"] for r in rows[1:]))
        assert page.locator("svg.online circle.point").count() == len(rows)
        browser.close()


def test_a_hackable_reward_model_is_caught_by_the_rubric(service, tiny_model, tmp_path):
    rows = _run(service, tiny_model, tmp_path / "hackable", hackable)
    gain, tolerance = _default("min_reward_gain"), _default("rubric_tolerance")
    gamed = [
        r
        for r in rows[1:]
        if r["candidate"]["reward"] > r["served"]["reward"] + gain
        and r["candidate"]["rubric"] < r["served"]["rubric"] - tolerance
    ]
    assert gamed, [(r["candidate"], r["served"]) for r in rows[1:]]
    assert all(not r["promoted"] and "being gamed" in r["reason"] for r in gamed)
    for r in rows[1:]:  # whatever the reason, nothing served scores worse on the rubric than what it replaced
        assert not r["promoted"] or r["candidate"]["rubric"] >= r["served"]["rubric"] - tolerance


def test_the_guard_names_the_first_rule_a_candidate_breaks():
    served = Evaluation(reward=0.5, rubric=0.6, kl=0.0)
    bounds = Bounds(min_reward_gain=0.01, rubric_tolerance=0.0, kl_max=0.5, agreement_drop=0.1)
    assert promotion(Evaluation(0.505, 0.7, 0.1), served, None, None, bounds)[1].startswith(
        "reward 0.505 does"
    )
    assert "being gamed" in promotion(Evaluation(0.9, 0.5, 0.1), served, None, None, bounds)[1]
    assert "over the bound" in promotion(Evaluation(0.9, 0.6, 0.8), served, None, None, bounds)[1]
    fell = promotion(Evaluation(0.9, 0.6, 0.1), served, 0.6, 0.8, bounds)
    assert not fell[0] and "agreement fell from 0.80 to 0.60" in fell[1]
    assert promotion(Evaluation(0.9, 0.6, 0.1), served, 0.75, 0.8, bounds)[0]


def test_the_judge_learns_in_context_from_the_latest_ratings_and_says_when_it_cannot_grade():
    events = [
        {
            "id": f"chatcmpl-{i:032x}",
            "choice": 0,
            "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
            "answer": f"{i + 1}" if i % 2 else "I am not sure",
            "rating": 1 if i % 2 else -1,
            "correction": None if i % 2 else str(i + 1),
        }
        for i in range(12)
    ]
    train, heldout = split(events)
    assert split(events) == (train, heldout) and len(heldout) < len(events)

    def by_length(body: dict) -> str:
        return "9" if len(_answer(body).split()) <= 2 else "1"

    with ScriptedOpenAI(default=by_length) as server:
        judge = JudgeReward(server.base_url, "judge", "k", "just the number", shots=3)
        judge.update(train)
        assert judge.score("What is 2 + 2?", "4") == 0.9
        prompt = server.requests[-1]["messages"][-1]["content"]
        assert prompt.count("- They ") == 3 and "just the number" in prompt  # the latest three ratings
        assert "they wanted" in prompt or "They liked" in prompt
        assert agreement(judge, events) == 1.0  # liked answers (short) always rank above disliked (long)
        assert agreement(judge, events[:4]) is None  # 2 x 2 pairs: too few to measure
        requests = len(server.requests)
        assert judge.score("What is 2 + 2?", "4") == 0.9 and len(server.requests) == requests  # cached
    with (
        ScriptedOpenAI(default=Reply("I would rather not")) as server,
        pytest.raises(RewardError, match="gave no grade"),
    ):
        JudgeReward(server.base_url, "judge", "k", "x").score("q", "a")


def test_the_simulated_users_preference_and_the_rubric():
    assert brief_arithmetic("What is 3 + 4?", "7") == 1.0
    assert brief_arithmetic("What is 3 - 4?", "The answer is -1.") == 1.0
    assert brief_arithmetic("What is 3 + 4?", "8") == 0.5
    assert brief_arithmetic("What is 3 + 4?", "well " * 12 + "7") == pytest.approx(0.5 + 0.5 * 6 / 13)
    assert user_rating("What is 3 + 4?", "7") == (1.0, None)
    assert user_rating("What is 3 + 4?", "it is eight") == (-1.0, "7")


def test_the_rule_judge_grades_over_http_as_a_judge_model_would(tmp_path):
    from nightlab.recipes.online.rule_judge import rule_judge_app
    from nightlab.train.api.background import serve_in_thread

    with serve_in_thread(rule_judge_app(brief_arithmetic)) as server:
        judge = JudgeReward(server.url + "/v1", "rule-judge", None, "brief arithmetic")
        assert judge.score("What is 3 + 4?", "7") == 1.0
        assert judge.score("What is 3 + 4?", "8") == 0.5
