"""The online loop's demo on the offline SmolLM2-135M-Instruct, without make or any network:

    python -m nightlab.recipes.online.demo --log-dir runs/online-demo [--rounds 3]

It starts `nightlab serve` (in this process) with SmolLM2 and a rule judge that grades by the demo's rubric,
then runs `nightlab online` rounds with a simulated user who asks arithmetic of the served alias and rates the
answers (correct, plain and brief). It prints the rounds; round 0 is the no-update baseline.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from nightlab.recipes.common.plots import plot_online
from nightlab.recipes.online.loop import OnlineConfig, demo_questions, run_online
from nightlab.recipes.online.reward import JudgeReward
from nightlab.recipes.online.rubric import brief_arithmetic
from nightlab.recipes.online.rule_judge import rule_judge_app
from nightlab.recipes.online.status import PLOT_FILE, status_table, summary
from nightlab.recipes.online.user import SimulatedUser

KEY = "tml-online-demo"


def run_demo(log_dir: Path, rounds: int = 3, data_dir: Path | None = None, **overrides: Any) -> list[dict]:
    """Serve SmolLM2 and the rule judge, run the rounds, return the journal's rows."""
    from nightlab.train import models
    from nightlab.train.api.app import create_app
    from nightlab.train.api.background import serve_in_thread
    from nightlab.train.settings import ServeSettings

    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="nightlab-online-demo-"))
    model = str(models.prepare_model("smollm2", data_dir, show_progress=False))
    settings = ServeSettings(data_dir=data_dir, device="cpu", api_keys=[KEY], allowed_models=[model])
    with (
        serve_in_thread(create_app(settings)) as service,
        serve_in_thread(rule_judge_app(brief_arithmetic)) as judge,
    ):
        values = {
            "rounds": rounds,
            "steps_per_round": 4,
            "prompts_per_step": 4,
            "group_size": 4,
            "max_tokens": 24,
            "learning_rate": 5e-4,
            "simulate_users": 8,
        } | overrides
        cfg = OnlineConfig(base_url=service.url, model=model, log_dir=log_dir, api_key=KEY, **values)
        reward = JudgeReward(judge.url + "/v1", "rule-judge", None, cfg.judge_rubric)
        user = SimulatedUser(service.url, KEY, cfg.alias, max_tokens=cfg.max_tokens)
        try:
            return run_online(
                cfg,
                reward,
                brief_arithmetic,
                lambda k: user.visit(demo_questions(k, cfg.simulate_users, cfg.seed)),
            )
        finally:
            user.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log-dir", type=Path, required=True, help="New directory for online.jsonl and the plot."
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = run_demo(args.log_dir, args.rounds)
    Console().print(status_table(rows))
    print(summary(rows))
    print(f"plot: {plot_online(rows, args.log_dir / PLOT_FILE)}")


if __name__ == "__main__":
    main()
