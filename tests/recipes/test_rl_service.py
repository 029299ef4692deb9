"""The RL recipe end to end on the tiny model: real service over HTTP, official tinker client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nightlab.recipes.rl import METRICS_FILE, PLOT_FILE, RLConfig, RLRun, build_batch, run_rl, sample_groups


def cfg(service, tiny_model: Path, log_dir: Path, **kw) -> RLConfig:
    settings = dict(
        env="tests.recipes.plugin_env:make", steps=2, prompts_per_step=2, group_size=4, max_tokens=8
    )
    settings.update(kw)
    return RLConfig(service.url, str(tiny_model), log_dir, api_key=service.api_key, **settings)


@pytest.mark.parametrize("loss", ["importance_sampling", "ppo"])
def test_a_policy_step_lowers_the_loss_on_its_own_batch(service, tiny_model, tmp_path, loss) -> None:
    with RLRun(cfg(service, tiny_model, tmp_path, loss=loss, learning_rate=1e-2)) as run:
        sampler = run.trainer.save_weights_and_get_sampling_client().result()
        groups = sample_groups(sampler, run.tokenizer, run.env, run.env.tasks(2, seed=0), run.cfg)
        assert [len(g.rollouts) for g in groups] == [4, 4]
        assert all(len(r.tokens) == len(r.logprobs) > 0 for g in groups for r in g.rollouts)
        data, metrics = build_batch(groups, kl_coef=0.0)
        assert data, metrics  # lengths differ, so the length reward has a spread
        before = run.trainer.forward(data, loss).result().metrics["loss:sum"]
        run.trainer.forward_backward(data, loss).result()
        run.trainer.optim_step(run.adam).result()
        after = run.trainer.forward(data, loss).result().metrics["loss:sum"]
        assert after < before, (before, after)


def test_run_logs_metrics_per_step_with_kl_and_plots(service, tiny_model, tmp_path) -> None:
    rows = run_rl(cfg(service, tiny_model, tmp_path, kl_coef=0.1), show_progress=False)
    logged = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert logged == rows and [r["step"] for r in rows] == [0, 1]
    for row in rows:
        assert {"reward_mean", "kl", "entropy", "tokens", "chars", "sample_s", "train_s"} <= set(row)
        assert row["tokens"] > 0 and row["entropy"] > 0
    # the adapter starts at zero, so the first step samples the base model itself: KL to it is ~0
    assert abs(rows[0]["kl"]) < 1e-3
    assert (tmp_path / PLOT_FILE).stat().st_size > 0
    with pytest.raises(ValueError, match="already holds"):
        run_rl(cfg(service, tiny_model, tmp_path), show_progress=False)


def test_a_failed_run_closes_its_session_as_errored(service, tiny_model, tmp_path, monkeypatch) -> None:
    def broken_reward(self, task, completion):
        raise RuntimeError("reward service down")

    monkeypatch.setattr("tests.recipes.plugin_env.LengthEnv.reward", broken_reward)
    before = len(service.session_outcomes())
    with pytest.raises(RuntimeError, match="reward service down"):
        run_rl(cfg(service, tiny_model, tmp_path, steps=1), show_progress=False)
    assert service.session_outcomes()[before:] == ["errored"]
