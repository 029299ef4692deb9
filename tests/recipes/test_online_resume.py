"""Resuming a killed online run: `nightlab online run` (a subprocess, against a real service over HTTP, with
the simulated user and a scripted judge) is killed with SIGKILL once round 1's row is in the journal, then
rerun with `--resume`. The run carries on from round 1's saved training state and cursors and ends with every
round once; runs that cannot continue the journal are refused with a message that says why."""

from __future__ import annotations

import inspect
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from nightlab.recipes.online.journal import JOURNAL, JournalRefused, NoOnlineJournal, read_rounds
from nightlab.recipes.online.loop import OnlineConfig, run_online
from nightlab.recipes.online.reward import JudgeReward, split, user_text
from nightlab.recipes.online.rubric import brief_arithmetic
from nightlab.train.adapter_files import OPTIMIZER_STATE, read_meta
from tests.fakes.scripted_openai import ScriptedOpenAI
from tests.recipes.test_online import honest

pytestmark = pytest.mark.timeout(300)

ROUNDS, STEPS = 3, 2
ALIAS = "assistant-resume"
SHOTS = inspect.signature(JudgeReward).parameters["shots"].default  # rated answers the CLI's judge is shown


def _command(service, tiny_model: Path, log_dir: Path, judge_url: str, *extra: str) -> list[str]:
    """`nightlab online run` with tiny settings: every round trains, saves and is judged in a few seconds."""
    values = {
        "base-url": service.url,
        "api-key": service.api_key,
        "model": str(tiny_model),
        "log-dir": str(log_dir),
        "alias": ALIAS,
        "rounds": ROUNDS,
        "steps-per-round": STEPS,
        "prompts-per-step": 2,
        "heldout-prompts": 4,
        "max-tokens": 16,
        "learning-rate": 2e-2,
        "lora-rank": 8,
        "kl-coef": 0.05,  # with a KL penalty every group trains: each RL step is one optimizer step
        "simulate-users": 4,
        "judge-url": judge_url,
        "judge-api-key": "test",
    }
    options = [part for name, value in values.items() for part in (f"--{name}", str(value))]
    return [sys.executable, "-m", "nightlab.cli", "online", "run", *options, *extra]


def _kill_after_round_one(command: list[str], log_dir: Path, output: Path) -> None:
    """Start the run and SIGKILL it as soon as round 1's row is written (round 2 is then under way)."""
    journal = log_dir / JOURNAL
    with output.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (journal.is_file() and len(journal.read_text().splitlines()) >= 2):
            assert proc.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "round 1 did not end in 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _feedback(service) -> list[dict]:
    found = httpx.get(f"{service.url}/v1/feedback", headers={"X-API-Key": service.api_key}, timeout=30)
    found.raise_for_status()
    return found.json()["data"]


def _saved_steps(service, state: str) -> tuple[int, set[int]]:
    """(optimizer steps the policy has taken, Adam's step counts) in a training state as the service saved it:
    the test's window, through the service's checkpoint store, on what a resume loaded."""
    run_id, _, checkpoint_id = state.removeprefix("tinker://").partition("/")
    with sqlite3.connect(service.data_dir / "service.db") as db:
        (directory,) = db.execute(
            "SELECT directory FROM checkpoints WHERE run_id=? AND checkpoint_id=?", (run_id, checkpoint_id)
        ).fetchone()
    saved = service.data_dir / "checkpoints" / directory
    moments = torch.load(saved / OPTIMIZER_STATE, weights_only=True)
    return read_meta(saved)["steps"], {int(v) for k, v in moments.items() if k.endswith("::step")}


def _config(service, tiny_model: Path, log_dir: Path, **values) -> OnlineConfig:
    return OnlineConfig(base_url=service.url, model=str(tiny_model), log_dir=log_dir, alias=ALIAS, **values)


def test_a_killed_run_resumes_from_its_last_round(service, tiny_model, tmp_path):
    log_dir = tmp_path / "run"
    with ScriptedOpenAI(default=honest) as judge:
        command = _command(service, tiny_model, log_dir, judge.base_url)
        _kill_after_round_one(command, log_dir, tmp_path / "killed.log")
        before = read_rounds(log_dir)
        assert [r["round"] for r in before] == [0, 1]  # round 2 was cut mid-way: it left no row

        again = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "--resume to continue" in again.stderr, again.stderr

        judged_before_resume = len(judge.requests)
        resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=240)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        first_judged = judge.requests[judged_before_resume]["messages"][-1]["content"]

    rows = read_rounds(log_dir)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert rows[:2] == before  # appended to, never rewritten
    assert f"{ROUNDS} rounds" in resumed.stdout  # the summary covers the whole run

    # The resumed round's trainer was loaded from round 1's saved state (a new training run on the service,
    # which round 3 then continued in memory) and its RL step counter carried on.
    assert rows[2]["resumed_from"] == rows[1]["state"]
    assert all("resumed_from" not in r for r in (rows[1], rows[3]))
    assert [r["rl_steps"] for r in rows] == [STEPS * k for k in range(ROUNDS + 1)]
    run_of = [r["checkpoint"].removeprefix("tinker://").split("/")[0] for r in rows[1:]]
    assert run_of[0] != run_of[1] == run_of[2]
    # What the service saved: every state holds all the optimizer steps since the run began (a fresh LoRA
    # would have started again from 0), and so does Adam's own count (its moments were loaded too).
    saved = [_saved_steps(service, r["state"]) for r in rows]
    assert saved == [(r["rl_steps"], {r["rl_steps"]} if r["rl_steps"] else set()) for r in rows]

    # The feedback cursor: every rating was taken in by exactly one round, none twice, none lost.
    ratings = _feedback(service)
    assert sum(r["events"] for r in rows[1:]) == len(ratings) and rows[2]["since"] > rows[1]["since"]
    # The reward model was rebuilt: the resumed judge's first prompt shows the latest training ratings, round
    # 1's included, as an uninterrupted run's judge would have.
    trained = split([e for e in ratings if e["updated_at"] <= rows[2]["since"]])[0]
    shown = [
        e for e in trained if f"this answer to {user_text(e['prompt'])!r}: {e['answer']!r}" in first_judged
    ]
    before_kill = [e for e in trained if e["updated_at"] <= rows[1]["since"]]
    assert shown == trained[-SHOTS:] and (not before_kill or before_kill[-1] in shown)

    promoted = [r["checkpoint"] for r in rows[1:] if r["promoted"]]
    alias = httpx.get(
        f"{service.url}/v1/aliases/{ALIAS}", headers={"X-API-Key": service.api_key}, timeout=30
    ).json()
    assert alias["model"] == (promoted[-1] if promoted else str(tiny_model))


def test_a_resume_must_keep_the_run_and_needs_a_journal(service, tiny_model, tmp_path):
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    reward = JudgeReward("http://127.0.0.1:9/v1", "judge", None, "brief")  # never asked: refused first
    with pytest.raises(NoOnlineJournal, match="nothing to resume"):
        run_online(_config(service, tiny_model, log_dir, resume=True), reward, brief_arithmetic)

    journal_row = {"round": 0, "run": {"model": str(tiny_model), "alias": ALIAS, "seed": 0}, "state": "x"}
    (log_dir / JOURNAL).write_text(json.dumps(journal_row) + "\n")
    other_seed = _config(service, tiny_model, log_dir, resume=True, seed=1)
    with pytest.raises(JournalRefused, match="its run has seed 0, not 1; pass --seed 0"):
        run_online(other_seed, reward, brief_arithmetic)
    other_model = _config(service, tiny_model.parent, log_dir, resume=True)
    with pytest.raises(JournalRefused, match=f"its run has model '{tiny_model}'"):
        run_online(other_model, reward, brief_arithmetic)
