"""`nightlab online run`: rounds of feedback -> reward model -> RL -> a guarded redeploy, on the public API.

Each round (once `every_events` new ratings arrived, when that is set):
1. read the feedback rated since the last round (`GET /v1/feedback`), split it once and for all into training
   and held-out events, update the reward model on the training ones and measure its agreement with the
   people on the held-out ones;
2. run `steps_per_round` GRPO steps (rl.py) on the LoRA policy, prompts drawn from what the users asked, the
   reward model as the reward and a KL penalty to the reference (base) model;
3. save the policy as sampler weights `online-<round>` and evaluate it and the checkpoint the alias serves now
   on fixed held-out prompts (reward-model score, rubric score, KL to the reference);
4. promote it (move the alias, atomically) only if the guard (guard.py) allows; otherwise keep it unserved and
   log why.
Every round is a row of `online.jsonl` in the log directory; round 0 is the no-update baseline (the base model
on the held-out prompts), which every later round is compared with. `nightlab online status` reads it.

Each row also saves the policy's training state (LoRA weights and Adam moments) and records the feedback
cursor and the RL step counter, so `--resume` carries a killed run on from its last row: the trainer is loaded
from that state, and the rest of the loop's state is rebuilt from the service (`OnlineRun.restore`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import tinker
from pydantic import dataclasses as pydantic_dataclasses

from nightlab.recipes.common.rl_envs import ArithmeticEnv, Reward, Task
from nightlab.recipes.common.settings import MODEL_NAME, SERVICE_KEY, SERVICE_URL, setting
from nightlab.recipes.online.guard import Bounds, Evaluation, promotion
from nightlab.recipes.online.journal import append_round, continued_rounds
from nightlab.recipes.online.reward import RewardModel, agreement, split, user_text
from nightlab.recipes.online.rubric import brief_arithmetic
from nightlab.recipes.rl import RLConfig, RLRun, add_reference_logprobs, sample_groups

Rubric = Callable[[str, str], float]
RUN_KEYS = ("model", "alias", "seed")  # what makes a journal's rows one run: a resume must keep them


@pydantic_dataclasses.dataclass
class OnlineConfig:
    """One online run: where the service is, what it serves, and how each round learns and is judged."""

    base_url: Annotated[str, SERVICE_URL]
    model: Annotated[str, MODEL_NAME]
    log_dir: Annotated[
        Path, setting("Directory for online.jsonl, one row per round: a new one, unless --resume.")
    ]
    api_key: Annotated[str | None, SERVICE_KEY] = None
    alias: Annotated[str, setting("The served alias a promotion moves.")] = "assistant-latest"
    rounds: Annotated[int, setting("Rounds to run.", ge=1)] = 3
    steps_per_round: Annotated[int, setting("RL steps per round.", ge=1)] = 4
    prompts_per_step: Annotated[int, setting("Prompts (groups) per RL step.", ge=1)] = 4
    group_size: Annotated[int, setting("Samples per prompt.", ge=2)] = 4
    heldout_prompts: Annotated[int, setting("Fixed held-out prompts each checkpoint is judged on.", ge=1)] = 8
    max_tokens: Annotated[int, setting("Longest answer.", ge=1)] = 24
    temperature: Annotated[float, setting("Sampling temperature.", ge=0)] = 1.0
    learning_rate: Annotated[float, setting("Adam learning rate.", ge=0)] = 1e-4
    lora_rank: Annotated[int, setting("LoRA rank.", ge=1)] = 16
    kl_coef: Annotated[float, setting("Per-token KL penalty to the reference model.", ge=0)] = 0.05
    kl_max: Annotated[float, setting("Guard: most KL (nats/token) a promoted checkpoint may have.", ge=0)] = (
        1.0
    )
    min_reward_gain: Annotated[
        float, setting("Guard: how much a promoted checkpoint must beat the served one's reward by.", ge=0)
    ] = 0.01
    rubric_tolerance: Annotated[
        float, setting("Guard: how far a promoted checkpoint's rubric score may fall (sampling noise).", ge=0)
    ] = 0.02
    seed: Annotated[int, setting("Seed for prompts and the LoRA init.")] = 0
    judge_url: Annotated[str, setting("The reward model: an OpenAI-compatible API that grades answers.")] = (
        "http://127.0.0.1:8000/v1"
    )
    judge_model: Annotated[str, setting("The judge's model name on that API.")] = "judge"
    judge_api_key: Annotated[str | None, setting("The judge API's key.", envvar="NIGHTLAB_JUDGE_API_KEY")] = (
        None
    )
    judge_rubric: Annotated[str, setting("What the users want, in words, for the judge.")] = (
        "Correct arithmetic, stated plainly and briefly: the number alone is best."
    )
    rubric: Annotated[
        str,
        setting("The guard's fixed rubric: brief-arithmetic, or package.module:function(prompt, answer)."),
    ] = "brief-arithmetic"
    every_events: Annotated[
        int, setting("Schedule: a round starts once this many new ratings arrived (0: right away).", ge=0)
    ] = 0
    simulate_users: Annotated[
        int,
        setting("Demo: a simulated user asks this many questions before each round and rates them.", ge=0),
    ] = 0
    resume: Annotated[
        bool,
        setting(
            "Carry on the run in --log-dir after its last recorded round (a killed run, or more rounds)."
        ),
    ] = False


class FeedbackEnv:
    """RL prompts from what the users asked (topped up from the arithmetic pool), scored by the reward model;
    the rubric is logged beside it, never trained on."""

    name = "feedback"

    def __init__(self, reward: RewardModel, rubric: Rubric, asked: list[str]) -> None:
        self.reward_model, self.rubric, self.asked = reward, rubric, asked
        self.pool = ArithmeticEnv()

    def tasks(self, n: int, seed: int) -> list[Task]:
        rng = random.Random(seed)
        drawn = [rng.choice(self.asked) for _ in range(n)] if self.asked else []
        drawn += [t.user for t in self.pool.tasks(n - len(drawn), seed)]
        return [Task(f"online-{seed}-{i}", user) for i, user in enumerate(drawn)]

    def reward(self, task: Task, completion: str) -> Reward:
        return Reward(
            self.reward_model.score(task.user, completion), {"rubric": self.rubric(task.user, completion)}
        )


class OnlineRun:
    """The clients and state of one online run; `round(k)` runs one round and returns its journal row."""

    def __init__(
        self, cfg: OnlineConfig, reward: RewardModel, rubric: Rubric, state: str | None = None
    ) -> None:
        self.cfg, self.reward_model, self.rubric = cfg, reward, rubric
        self.asked: list[str] = []
        self.env = FeedbackEnv(reward, rubric, self.asked)
        self.rl_cfg = RLConfig(
            base_url=cfg.base_url,
            model=cfg.model,
            log_dir=cfg.log_dir,
            api_key=cfg.api_key,
            steps=cfg.steps_per_round,
            prompts_per_step=cfg.prompts_per_step,
            group_size=cfg.group_size,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            learning_rate=cfg.learning_rate,
            lora_rank=cfg.lora_rank,
            kl_coef=cfg.kl_coef,
            measure_kl=True,
            seed=cfg.seed,
        )
        self.rl = RLRun(self.rl_cfg, self.env, state)
        self.heldout = [t.user for t in ArithmeticEnv().tasks(cfg.heldout_prompts, seed=cfg.seed + 7_919)]
        self.http = httpx.Client(
            base_url=cfg.base_url.rstrip("/") + "/v1",
            headers={"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {},
            timeout=120,
        )
        self.since = 0.0
        self.heldout_events: list[dict[str, Any]] = []
        self.agreement_at_promotion: float | None = None
        self.step = 0

    def close(self, *exc_info: object) -> None:
        self.http.close()
        self.rl.__exit__(*exc_info)

    def served(self) -> str:
        """What the alias serves now: a tinker:// checkpoint, or the base model before any promotion."""
        found = self.http.get(f"/aliases/{self.cfg.alias}")
        if found.status_code == 404:
            return self.cfg.model
        found.raise_for_status()
        return str(found.json()["model"])

    def evaluate(self, model: str) -> Evaluation:
        """`model` on the held-out prompts: reward-model and rubric scores, and its KL to the reference."""
        sampler = sampling_client(self.rl.service, model)
        tasks = [Task(f"heldout-{i}", user) for i, user in enumerate(self.heldout)]
        groups = sample_groups(
            sampler, self.rl.tokenizer, self.env, tasks, self.rl_cfg, seed=self.cfg.seed + 1
        )
        assert self.rl.reference is not None, "measure_kl is on"
        add_reference_logprobs(self.rl.reference, groups)
        rollouts = [r for g in groups for r in g.rollouts]
        kl = [lp - ref for r in rollouts for lp, ref in zip(r.logprobs, r.ref_logprobs or [], strict=False)]
        return Evaluation(
            reward=float(np.mean([r.reward.value for r in rollouts])),
            rubric=float(np.mean([r.reward.metrics["rubric"] for r in rollouts])),
            kl=float(np.mean(kl)) if kl else 0.0,
        )

    def rated_since(self, since: float) -> list[dict[str, Any]]:
        """This key's ratings rated after `since` (Unix time), in the order they were first rated."""
        found = self.http.get("/feedback", params={"since": since})
        found.raise_for_status()
        return found.json()["data"]

    def wait_for_ratings(self, count: int, poll_seconds: float = 5.0) -> None:
        """Block until `count` ratings arrived since the last round (the loop's schedule)."""
        while len(self.rated_since(self.since)) < count:
            time.sleep(poll_seconds)

    def take_in(self, events: list[dict[str, Any]]) -> None:
        """Split rated answers (by id, so always the same way): the training ones update the reward model and
        the prompts RL draws from, the held-out ones measure the reward model."""
        train, heldout = split(events)
        self.reward_model.update(train)
        self.heldout_events += heldout
        self.asked += [user_text(e["prompt"]) for e in train]

    def feedback(self) -> tuple[int, float | None]:
        """Take in what was rated since the last round; (how many events, the held-out agreement now)."""
        events = self.rated_since(self.since)
        if events:
            self.since = max(e["updated_at"] for e in events)
        self.take_in(events)
        return len(events), agreement(self.reward_model, self.heldout_events)

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """The loop's state as the journal's last row left it (the trainer already holds its saved state):
        every rating up to its cursor taken in again, in order, so the reward model, the held-out events and
        the asked prompts are as they were; its RL step counter; the agreement at the last promotion."""
        last = rows[-1]
        self.since, self.step = last["since"], last["rl_steps"]
        self.take_in([e for e in self.rated_since(0.0) if e["updated_at"] <= self.since])
        promoted = [r for r in rows[1:] if r["promoted"]]
        self.agreement_at_promotion = promoted[-1]["agreement"] if promoted else None

    def resume_point(self, index: int) -> dict[str, Any]:
        """What a resume after round `index` needs: the policy's training state (LoRA weights and Adam
        moments) saved now, the feedback cursor and the RL step counter."""
        state = self.rl.trainer.save_state(f"online-{index}").result().path
        return {"state": state, "since": self.since, "rl_steps": self.step}

    def baseline(self) -> dict[str, Any]:
        """Round 0: the base model on the held-out prompts, the no-update baseline; it also records what
        makes the rows one run (`run`), which a resume checks."""
        base = self.evaluate(self.cfg.model)
        return {
            "round": 0,
            "time": time.time(),
            "checkpoint": self.cfg.model,
            "candidate": asdict(base),
            "run": {key: getattr(self.cfg, key) for key in RUN_KEYS},
            **self.resume_point(0),
        }

    def round(self, index: int) -> dict[str, Any]:
        events, agreed = self.feedback()
        steps = []
        for _ in range(self.cfg.steps_per_round):
            steps.append(self.rl.step(self.step))
            self.step += 1
        path = self.rl.trainer.save_weights_for_sampler(f"online-{index}").result().path
        served = self.served()
        candidate, current = self.evaluate(path), self.evaluate(served)
        cfg = self.cfg
        bounds = Bounds(cfg.min_reward_gain, cfg.rubric_tolerance, cfg.kl_max)
        promote, why = promotion(candidate, current, agreed, self.agreement_at_promotion, bounds)
        if promote:
            moved = self.http.put(f"/aliases/{self.cfg.alias}", json={"model": path, "reason": why})
            moved.raise_for_status()
            self.agreement_at_promotion = agreed
        return {
            "round": index,
            "time": time.time(),
            "events": events,
            "agreement": agreed,
            "train_reward": float(np.mean([s["reward_mean"] for s in steps])),
            "checkpoint": path,
            "served_before": served,
            "candidate": asdict(candidate),
            "served": asdict(current),
            "promoted": promote,
            "reason": why,
            **self.resume_point(index),
        }


def run_online(
    cfg: OnlineConfig,
    reward: RewardModel,
    rubric: Rubric,
    between_rounds: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Round 0 (the baseline), then rounds up to `cfg.rounds`, each row appended to `log_dir/online.jsonl` as
    it ends, and all the rows returned. With `cfg.resume` the run carries on after the journal's last row (a
    round cut mid-way left none and is rerun). `between_rounds(k)` runs before round k (the simulated users
    of the demo and tests)."""
    rows = continued_rounds(cfg.log_dir, {key: getattr(cfg, key) for key in RUN_KEYS}, cfg.resume)
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = rows[-1]["state"] if rows else None
    run = OnlineRun(cfg, reward, rubric, resumed_from)
    try:
        if rows:
            run.restore(rows)
        else:
            if run.served() == cfg.model:  # until the first promotion the alias serves the base model
                start_body = {"model": cfg.model, "reason": "online run start"}
                start = run.http.put(f"/aliases/{cfg.alias}", json=start_body)
                start.raise_for_status()
            rows.append(run.baseline())
            append_round(cfg.log_dir, rows[-1])
        first = len(rows)
        for k in range(first, cfg.rounds + 1):
            if between_rounds is not None:
                between_rounds(k)
            run.wait_for_ratings(cfg.every_events)
            row = run.round(k)
            if resumed_from is not None and k == first:
                row["resumed_from"] = resumed_from  # the saved state this round's training continued
            rows.append(row)
            append_round(cfg.log_dir, row)
    except BaseException as exc:
        run.close(type(exc), exc, exc.__traceback__)
        raise
    run.close(None, None, None)
    return rows


def sampling_client(service: tinker.ServiceClient, model: str) -> tinker.SamplingClient:
    """A sampler of a tinker:// checkpoint or of a base model, by its name."""
    if model.startswith("tinker://"):
        return service.create_sampling_client(model_path=model).result()
    return service.create_sampling_client(base_model=model).result()


def load_rubric(spec: str) -> Rubric:
    """`brief-arithmetic` or `package.module:function`, a function(prompt, answer) -> score on [0, 1]."""
    import importlib

    if spec == "brief-arithmetic":
        return brief_arithmetic
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"unknown rubric {spec!r}: use brief-arithmetic or package.module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load rubric {spec!r}: {exc}") from exc


def demo_questions(round_index: int, count: int, seed: int) -> list[str]:
    """The simulated user's questions before a round: fresh arithmetic each round."""
    return [t.user for t in ArithmeticEnv().tasks(count, seed=seed * 1_000 + round_index)]
