"""GRPO-style RL with LoRA on verifiable rewards, over the public tinker client only.

Each step: snapshot the current weights into a sampling client, draw a group of completions per prompt, score
them with the environment, turn rewards into group-relative advantages (reward minus the group's mean, so a
group's advantages sum to zero and a group where every sample scored the same carries no reward signal: it is
dropped, unless a KL penalty still has something to teach on it), optionally subtract a per-token KL penalty
against the base model, and take one policy-gradient step with the `importance_sampling` or `ppo` loss on
datums that carry the sampler's own logprobs. One JSONL row of metrics per step; a plot of them at the end.
"""

from __future__ import annotations

import contextlib
import json
import time
import typing
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tinker
from pydantic import dataclasses as pydantic_dataclasses
from pydantic import field_validator

from nightlab.recipes.common.chat_format import chat_prompt
from nightlab.recipes.common.rl_envs import Environment, Reward, Task, load_env
from nightlab.recipes.common.service import connect
from nightlab.recipes.common.settings import MODEL_NAME, SERVICE_KEY, SERVICE_URL, setting

LossName = Literal["importance_sampling", "ppo"]
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "rl_metrics.png"


@pydantic_dataclasses.dataclass
class RLConfig:
    """Everything one RL run needs, declared once: the CLI's options are made from these fields. Defaults run
    a few CPU steps of the built-in environment."""

    base_url: Annotated[str, SERVICE_URL]
    model: Annotated[str, MODEL_NAME]
    log_dir: Annotated[Path, setting("New directory for metrics.jsonl and the plot.")]
    api_key: Annotated[str | None, SERVICE_KEY] = None
    env: Annotated[str, setting("Environment: arithmetic, or package.module:factory for your own.")] = (
        "arithmetic"
    )
    steps: Annotated[int, setting("Optimizer steps.", ge=1)] = 10
    prompts_per_step: Annotated[int, setting("Prompts (groups) per step.", ge=1)] = 4
    group_size: Annotated[int, setting("Samples per prompt; advantages are relative to the group.", ge=2)] = 4
    max_tokens: Annotated[int, setting("Longest completion.", ge=1)] = 16
    temperature: Annotated[float, setting("Sampling temperature.", ge=0)] = 1.0
    learning_rate: Annotated[float, setting("Adam learning rate.", ge=0)] = 3e-4
    lora_rank: Annotated[int, setting("LoRA rank.", ge=1)] = 16
    loss: Annotated[LossName, setting("importance_sampling or ppo.")] = "importance_sampling"
    kl_coef: Annotated[float, setting("Per-token KL penalty to the base model (0: off).", ge=0)] = 0.0
    measure_kl: Annotated[
        bool,
        setting("Measure the KL to the base model (one prefill per sample; the penalty needs it too)."),
    ] = True
    seed: Annotated[int, setting("Seed for prompts and the LoRA init.")] = 0

    @field_validator("loss", mode="before")
    @classmethod
    def _known_loss(cls, value: object) -> object:
        if value not in typing.get_args(LossName):
            raise ValueError(f"loss must be importance_sampling or ppo, not {value!r}")
        return value


@dataclass
class Rollout:
    """One sampled completion with the sampler's per-token logprobs and, when measured, the base model's."""

    tokens: list[int]
    logprobs: list[float]
    text: str
    reward: Reward
    ref_logprobs: list[float] | None = None


@dataclass
class Group:
    task: Task
    prompt: list[int]
    rollouts: list[Rollout] = field(default_factory=list)


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """Reward minus the group mean. No division by the std: it overweights groups that barely differ."""
    mean = float(np.mean(rewards))
    return [float(r) - mean for r in rewards]


def trains_on(advantages: Sequence[float], kl_coef: float) -> bool:
    """Whether a group becomes datums: it has a reward spread, or the KL penalty applies to its tokens
    anyway."""
    return kl_coef > 0 or any(abs(a) > 1e-9 for a in advantages)


def rl_datum(
    prompt: list[int], completion: list[int], logprobs: list[float], advantages: list[float]
) -> tinker.Datum:
    """A policy-gradient datum: prompt positions carry zero advantage, completion positions the sampler's
    logprobs."""
    if not completion or not (len(completion) == len(logprobs) == len(advantages)):
        raise ValueError("a completion needs at least one token and one logprob and advantage per token")
    tokens = prompt + completion
    pad = [0.0] * (len(prompt) - 1)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": pad + list(logprobs),
            "advantages": pad + list(advantages),
        },
    )


def sample_groups(
    sampler: tinker.SamplingClient,
    tokenizer,
    env: Environment,
    tasks: list[Task],
    cfg: RLConfig,
    seed: int | None = None,
) -> list[Group]:
    """All groups' requests go out at once; the service batches them. With `seed`, the same sampler draws the
    same completions (two checkpoints compared on the same draws differ only by their weights)."""
    params = tinker.SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=seed)
    groups = [Group(task, chat_prompt(tokenizer, task.user, think=False)) for task in tasks]
    futures = [
        sampler.sample(
            tinker.ModelInput.from_ints(g.prompt), num_samples=cfg.group_size, sampling_params=params
        )
        for g in groups
    ]
    for group, future in zip(groups, futures, strict=True):
        for seq in future.result().sequences:
            text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
            group.rollouts.append(
                Rollout(list(seq.tokens), list(seq.logprobs or []), text, env.reward(group.task, text))
            )
    return groups


def add_reference_logprobs(reference: tinker.SamplingClient, groups: list[Group]) -> None:
    """The base model's logprob of every sampled token, via `compute_logprobs` on prompt + completion."""
    pending: list[tuple[Rollout, int, Future]] = []
    for g in groups:
        for r in g.rollouts:
            if r.tokens:
                future = reference.compute_logprobs(tinker.ModelInput.from_ints(g.prompt + r.tokens))
                pending.append((r, len(g.prompt), future))
    for rollout, start, future in pending:
        rollout.ref_logprobs = [float(x) for x in future.result()[start:]]


def build_batch(groups: list[Group], kl_coef: float) -> tuple[list[tinker.Datum], dict[str, float]]:
    """Datums for every group that `trains_on`, plus the step's rollout metrics."""
    data: list[tinker.Datum] = []
    rewards, lengths, sampler_lp, kl = [], [], [], []
    components: dict[str, list[float]] = {}
    skipped = 0
    for g in groups:
        group_rewards = [r.reward.value for r in g.rollouts]
        rewards += group_rewards
        advantages = group_advantages(group_rewards)
        kept = trains_on(advantages, kl_coef)
        skipped += not kept
        for rollout, adv in zip(g.rollouts, advantages, strict=True):
            lengths.append(len(rollout.tokens))
            sampler_lp += rollout.logprobs
            for key, value in rollout.reward.metrics.items():
                components.setdefault(key, []).append(value)
            token_kl = (
                np.array(rollout.logprobs) - np.array(rollout.ref_logprobs)
                if rollout.ref_logprobs is not None
                else None
            )
            if token_kl is not None:
                kl += token_kl.tolist()
            if not kept or not rollout.tokens:
                continue
            token_adv = np.full(len(rollout.tokens), adv)
            if kl_coef and token_kl is not None:
                token_adv = token_adv - kl_coef * token_kl
            data.append(rl_datum(g.prompt, rollout.tokens, rollout.logprobs, token_adv.tolist()))
    metrics = {
        "reward_mean": float(np.mean(rewards)),
        "reward_std": float(np.std(rewards)),
        "entropy": float(-np.mean(sampler_lp)) if sampler_lp else 0.0,
        "tokens": float(sum(lengths)),
        "completion_len": float(np.mean(lengths)),
        "groups_skipped": float(skipped),
        "datums": float(len(data)),
        **{key: float(np.mean(values)) for key, values in components.items()},
    }
    if kl:
        metrics["kl"] = float(np.mean(kl))
    return data, metrics


class RLRun:
    """One RL run against a service: holds the clients so steps can be driven (and timed) one by one.

    Use it as a context manager: the session is closed as success, errored or interrupted with the block's
    outcome.
    """

    def __init__(self, cfg: RLConfig, env: Environment | None = None, state: str | None = None) -> None:
        """`state`, a `save_state` path, continues a policy (its LoRA weights and Adam moments) where a
        killed run left it, instead of starting a fresh LoRA."""
        self.cfg = cfg
        self.env = env or load_env(cfg.env)  # an environment object (the online loop's) or cfg.env's
        self.service = connect(cfg.base_url, cfg.api_key)
        with contextlib.ExitStack() as on_failure:  # a failed setup closes the session as errored
            on_failure.push(self.service)
            self.trainer = (
                self.service.create_training_client_from_state_with_optimizer(state).result()
                if state
                else self.service.create_lora_training_client(
                    base_model=cfg.model, rank=cfg.lora_rank, seed=cfg.seed
                ).result()
            )
            self.tokenizer = self.trainer.get_tokenizer()
            wants_reference = cfg.measure_kl or cfg.kl_coef > 0
            self.reference = (
                self.service.create_sampling_client(base_model=cfg.model).result()
                if wants_reference
                else None
            )
            on_failure.pop_all()
        self.adam = tinker.AdamParams(learning_rate=cfg.learning_rate)

    def step(self, index: int) -> dict[str, float]:
        """Sample from the latest weights, score, and take one optimizer step; return the step's metrics."""
        t0 = time.perf_counter()
        sampler = self.trainer.save_weights_and_get_sampling_client().result()
        seed = self.cfg.seed * 100_003 + index
        tasks = self.env.tasks(self.cfg.prompts_per_step, seed=seed)
        groups = sample_groups(sampler, self.tokenizer, self.env, tasks, self.cfg, seed=seed)  # reproducible
        if self.reference is not None:
            add_reference_logprobs(self.reference, groups)
        data, metrics = build_batch(groups, self.cfg.kl_coef)
        t1 = time.perf_counter()
        if data:
            fb = self.trainer.forward_backward(data, self.cfg.loss)
            opt = self.trainer.optim_step(self.adam)
            metrics["loss"] = float(fb.result().metrics["loss:sum"])
            opt.result()
        t2 = time.perf_counter()
        return {"step": index, **metrics, "sample_s": t1 - t0, "train_s": t2 - t1}

    def __enter__(self) -> RLRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.service.__exit__(*exc_info)


def run_rl(cfg: RLConfig, show_progress: bool = True) -> list[dict[str, float]]:
    """Run `cfg.steps` steps; append each step's metrics to `log_dir/metrics.jsonl`; plot them."""
    from rich.progress import Progress

    from nightlab.recipes.common.plots import plot_rl_metrics

    log = cfg.log_dir / METRICS_FILE
    if log.exists() and log.stat().st_size:
        raise ValueError(f"{log} already holds a run's metrics; pick a new log directory")
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    (cfg.log_dir / "config.json").write_text(json.dumps(asdict(cfg), default=str, indent=2))
    rows = []
    with (
        RLRun(cfg) as run,
        Progress(disable=not show_progress) as progress,
        log.open("a", encoding="utf-8") as fh,
    ):
        bar = progress.add_task("RL steps", total=cfg.steps)
        for i in range(cfg.steps):
            row = run.step(i)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            rows.append(row)
            progress.update(bar, advance=1, description=f"RL reward {row['reward_mean']:.3f}")
    plot_rl_metrics(rows, cfg.log_dir / PLOT_FILE)
    return rows
