"""RL building blocks without a server: environments, group-relative advantages, datums, batch metrics."""

from __future__ import annotations

import numpy as np
import pytest

from nightlab.recipes.common.rl_envs import ArithmeticEnv, Environment, Reward, Task, load_env
from nightlab.recipes.rl import Group, RLConfig, Rollout, build_batch, group_advantages, rl_datum, trains_on


def test_arithmetic_env_pays_for_correct_and_for_the_asked_format() -> None:
    env = ArithmeticEnv(max_operand=9)
    tasks = env.tasks(6, seed=3)
    assert tasks == env.tasks(6, seed=3) and tasks != env.tasks(6, seed=4)
    task = tasks[0]
    answer = task.payload["answer"]
    assert "The answer is <number>" in task.user
    assert env.reward(task, f"The answer is {answer}.").value == pytest.approx(1.2)
    assert env.reward(task, f"{answer}").value == pytest.approx(1.0)
    assert env.reward(task, f"The answer is {answer + 1}.").metrics == {"correct": 0.0, "formatted": 1.0}
    assert env.reward(task, "no idea").value == 0.0


def test_load_env_builtin_plugin_and_clear_errors() -> None:
    assert isinstance(load_env("arithmetic"), ArithmeticEnv)
    plugin = load_env("tests.recipes.plugin_env:make")
    assert isinstance(plugin, Environment) and plugin.name == "length"
    with pytest.raises(ValueError, match="unknown environment 'nope'"):
        load_env("nope")
    with pytest.raises(ValueError, match="cannot load"):
        load_env("tests.recipes.plugin_env:missing")
    with pytest.raises(ValueError, match="lacks name/tasks/reward"):
        load_env("tests.recipes.plugin_env:not_an_env")


def test_group_advantages_are_centred() -> None:
    adv = group_advantages([1.0, 0.0, 0.2, 0.2])
    assert sum(adv) == pytest.approx(0.0)
    assert adv[0] > adv[2] > adv[1]
    assert group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]


def test_rl_datum_aligns_sampler_logprobs_and_advantages_with_the_completion() -> None:
    datum = rl_datum([10, 11, 12], [20, 21], [-0.5, -1.5], [0.3, 0.3])
    assert datum.model_input.to_ints() == [10, 11, 12, 20]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [11, 12, 20, 21]
    assert datum.loss_fn_inputs["logprobs"].tolist() == pytest.approx([0, 0, -0.5, -1.5])
    assert datum.loss_fn_inputs["advantages"].tolist() == pytest.approx([0, 0, 0.3, 0.3])
    with pytest.raises(ValueError):
        rl_datum([1, 2], [], [], [])


def rollout(reward: float, n: int = 2, ref: list[float] | None = None) -> Rollout:
    return Rollout(
        list(range(30, 30 + n)), [-1.0] * n, "x", Reward(reward, {"correct": float(reward > 0)}), ref
    )


def test_build_batch_applies_the_kl_penalty_and_keeps_flat_groups_for_it() -> None:
    task = Task("t", "u")
    informative = Group(task, [1, 2], [rollout(1.0, ref=[-2.0, -2.0]), rollout(0.0, ref=[-1.0, -1.0])])
    flat = Group(task, [1, 2], [rollout(0.0, ref=[-1.5, -1.5]), rollout(0.0, ref=[-1.0, -1.0])])
    data, metrics = build_batch([informative, flat], kl_coef=0.5)
    assert len(data) == 4 and metrics["groups_skipped"] == 0.0 and metrics["datums"] == 4.0
    assert metrics["reward_mean"] == pytest.approx(0.25) and metrics["correct"] == pytest.approx(0.25)
    assert metrics["entropy"] == pytest.approx(1.0) and metrics["tokens"] == 8.0
    assert metrics["kl"] == pytest.approx(np.mean([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0]))
    # advantage minus 0.5 * (sampler - reference) per token
    advantages = [d.loss_fn_inputs["advantages"].tolist()[-2:] for d in data]
    assert advantages == [pytest.approx(v) for v in ([0.0, 0.0], [-0.5, -0.5], [-0.25, -0.25], [0.0, 0.0])]
    # the flat group has no reward signal (advantage 0) but the KL term still pulls it toward the base model


def test_build_batch_without_kl_drops_flat_groups() -> None:
    task = Task("t", "u")
    informative = Group(task, [1, 2], [rollout(1.0), rollout(0.0)])
    flat = Group(task, [1, 2], [rollout(0.0), rollout(0.0)])
    data, metrics = build_batch([informative, flat], kl_coef=0.0)
    assert len(data) == 2 and metrics["groups_skipped"] == 1.0 and "kl" not in metrics
    per_datum = [sum(d.loss_fn_inputs["advantages"].tolist()) / 2 for d in data]
    assert per_datum == pytest.approx([0.5, -0.5]) and sum(per_datum) == pytest.approx(0.0)


def test_trains_on_groups_with_a_spread_or_under_a_kl_penalty() -> None:
    assert trains_on([0.5, -0.5], 0.0) and trains_on([0.0, 0.0], 0.1) and not trains_on([0.0, 0.0], 0.0)


def test_config_refuses_bad_settings(tmp_path) -> None:
    with pytest.raises(ValueError, match="group_size"):
        RLConfig("u", "m", tmp_path, group_size=1)
    with pytest.raises(ValueError, match="loss"):
        RLConfig("u", "m", tmp_path, loss="sft")  # type: ignore[arg-type]
