"""A plug-in environment for the RL tests: rewards longer completions, so even a random model gets a
spread."""

from __future__ import annotations

from nightlab.recipes.common.rl_envs import Reward, Task


class LengthEnv:
    name = "length"

    def tasks(self, n: int, seed: int) -> list[Task]:
        return [Task(f"len-{seed}-{i}", f"Say something long, number {i}.") for i in range(n)]

    def reward(self, task: Task, completion: str) -> Reward:
        return Reward(len(completion) / 10.0, {"chars": float(len(completion))})


def make() -> LengthEnv:
    return LengthEnv()


def not_an_env() -> object:
    return object()
