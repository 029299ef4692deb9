"""Time per RL step, split into sampling and training: nightlab's service vs raw transformers + PEFT.

    python benchmarks/rl_step.py --model /path/to/prepared/smollm2  # from `nightlab models prepare smollm2`
    python benchmarks/rl_step.py --tiny                             # the tiny random model, in seconds

Both sides do the same work per step: `prompts` x `group_size` completions of up to `max_tokens` tokens from
the current LoRA weights, rewards from the arithmetic environment, group-relative advantages, and one
importance-sampling step on a LoRA of the same rank over all linear layers, on the completions of the groups
the recipe trains on (`trains_on`: flat-reward groups are dropped on both sides). The samples differ between
the sides, so the number of datums trained per step is printed beside the times. The service side goes through
HTTP and the tinker client (snapshot weights, sample, forward_backward, optim_step); the raw side calls
`generate` and a training step in process. The first step of each side is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nightlab.recipes.common.chat_format import chat_prompt
from nightlab.recipes.common.rl_envs import ArithmeticEnv
from nightlab.recipes.rl import RLConfig, RLRun, group_advantages, trains_on
from nightlab.train.api.background import BackgroundServer, serve_in_thread


def start_service(data_dir: Path, model: str) -> BackgroundServer:
    from nightlab.train.api.app import create_app
    from nightlab.train.engine import Engine
    from nightlab.train.settings import ServeSettings

    settings = ServeSettings(data_dir=data_dir, device="cpu", api_keys=["tml-bench"], allowed_models=[model])
    return serve_in_thread(create_app(settings, Engine(data_dir, device="cpu", show_progress=False)))


Timing = tuple[float, float, int]  # sampling seconds, training seconds, datums trained on


def bench_service(cfg: RLConfig) -> list[Timing]:
    with RLRun(cfg) as run:
        rows = [run.step(i) for i in range(cfg.steps + 1)]
    return [(r["sample_s"], r["train_s"], int(r["datums"])) for r in rows[1:]]


class RawRL:
    """The same RL step written directly against transformers + PEFT, in one process, no server."""

    def __init__(self, cfg: RLConfig) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nightlab.train.forward import pick_autocast

        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        self.model = get_peft_model(base, lora)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=cfg.learning_rate, betas=(0.9, 0.95)
        )
        self.autocast = pick_autocast("cpu", "auto")
        self.env = ArithmeticEnv()

    def step(self, index: int) -> Timing:
        t0 = time.perf_counter()
        tasks = self.env.tasks(self.cfg.prompts_per_step, seed=self.cfg.seed * 100_003 + index)
        prompts = [chat_prompt(self.tokenizer, t.user, think=False) for t in tasks]
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(
                **batch,
                do_sample=True,
                temperature=self.cfg.temperature,
                max_new_tokens=self.cfg.max_tokens,
                num_return_sequences=self.cfg.group_size,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        width = batch["input_ids"].shape[1]
        completions = out.sequences[:, width:]
        old_logprobs = torch.stack(
            [
                torch.log_softmax(s.float(), -1).gather(-1, completions[:, i : i + 1]).squeeze(-1)
                for i, s in enumerate(out.scores)
            ],
            dim=1,
        )
        mask = torch.ones_like(completions, dtype=torch.float32)
        for row, seq in enumerate(completions.tolist()):  # everything after the first EOS is padding
            if self.tokenizer.eos_token_id in seq:
                mask[row, seq.index(self.tokenizer.eos_token_id) + 1 :] = 0
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = [self.env.reward(tasks[i // self.cfg.group_size], t).value for i, t in enumerate(texts)]
        advantages, keep = [], []
        for g in range(len(tasks)):
            group = group_advantages(rewards[g * self.cfg.group_size : (g + 1) * self.cfg.group_size])
            advantages += group
            keep += [trains_on(group, self.cfg.kl_coef)] * len(group)
        rows = torch.tensor(keep)
        t1 = time.perf_counter()
        if not rows.any():
            return t1 - t0, 0.0, 0
        self.model.train()
        attention = torch.cat(
            [batch["attention_mask"].repeat_interleave(self.cfg.group_size, 0), mask.long()], 1
        )
        ctx = (
            torch.autocast("cpu", dtype=self.autocast)
            if self.autocast
            else torch.autocast("cpu", enabled=False)
        )
        with ctx:
            logits = self.model(input_ids=out.sequences[rows], attention_mask=attention[rows]).logits[
                :, width - 1 : -1
            ]
        logprobs = (
            torch.log_softmax(logits.float(), -1).gather(-1, completions[rows].unsqueeze(-1)).squeeze(-1)
        )
        # padding after EOS may have -inf sampler scores (top-k masks them): drop it before exp, not after
        live = mask[rows] > 0
        ratio = torch.exp(torch.where(live, logprobs - old_logprobs[rows], 0.0))
        loss = -(ratio * torch.tensor(advantages)[rows, None] * live).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1, int(rows.sum())


def bench_raw(cfg: RLConfig) -> list[Timing]:
    raw = RawRL(cfg)
    return [raw.step(i) for i in range(cfg.steps + 1)][1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="A prepared model directory (e.g. SmolLM2 from `nightlab models prepare`)."
    )
    parser.add_argument("--tiny", action="store_true", help="Use the tiny random model instead.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per side (after one warm-up).")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="nightlab-rl-bench-") as tmp:
        if args.tiny:
            from nightlab.train.tiny import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny"))
        elif args.model:
            model = args.model
        else:
            parser.error("pass --model DIR (see `nightlab models list`) or --tiny")
        with start_service(Path(tmp) / "serve", model) as background:
            cfg = RLConfig(
                background.url,
                model,
                Path(tmp) / "log",
                api_key="tml-bench",
                steps=args.steps,
                prompts_per_step=args.prompts,
                group_size=args.group_size,
                max_tokens=args.max_tokens,
                lora_rank=args.rank,
                measure_kl=False,
            )
            service = bench_service(cfg)
        raw = bench_raw(cfg)
    report(model, cfg, {"nightlab service": service, "transformers+PEFT": raw})


def report(model: str, cfg: RLConfig, results: dict[str, list[Timing]]) -> None:
    samples = cfg.prompts_per_step * cfg.group_size
    print(
        f"model {model}; per step: {samples} completions of <= {cfg.max_tokens} tokens, LoRA rank "
        f"{cfg.lora_rank}; median of {cfg.steps} steps after a warm-up; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'side':<20}{'sample s':>10}{'train s':>10}{'step s':>10}{'datums':>10}  (datums per timed step)")
    medians = {}
    for side, times in results.items():
        s, t = statistics.median(x for x, _, _ in times), statistics.median(y for _, y, _ in times)
        medians[side] = (s, t, s + t)
        datums = ",".join(str(n) for *_, n in times)
        print(f"{side:<20}{s:>10.2f}{t:>10.2f}{s + t:>10.2f}{datums:>10}")
    service, raw = medians["nightlab service"], medians["transformers+PEFT"]
    ratios = [
        f"{a / b:.2f}" if b else "n/a" for a, b in zip(service, raw, strict=True)
    ]  # n/a: nothing trained
    print(f"{'ratio service/raw':<20}" + "".join(f"{r:>10}" for r in ratios))


if __name__ == "__main__":
    main()
