"""The llm proposer against a scripted OpenAI-compatible server over real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab.research.edits import EditError, apply_patch
from nightlab.research.proposers import llm
from nightlab.research.proposers.base import PastExperiment, ProposalContext, Proposer, ProposerUnavailable
from nightlab.research.proposers.llm import LLMError, LLMProposer, LLMSection, LLMUnavailable
from tests.fakes import Reply, ScriptedOpenAI

TRAIN = "LR = 0.01\nDEPTH = 4\n\n\ndef lr(step):\n    return LR\n"
PROGRAM = "# Make tinygpt better\nLower val_bpb. Do not touch prepare.py."
GOOD = """DESCRIPTION: double the learning rate
RATIONALE: the loss still falls steeply at the end, so training is under-stepped.

train.py
```python
<<<<<<< SEARCH
LR = 0.01
=======
LR = 0.02
>>>>>>> REPLACE
```
"""
STALE = GOOD.replace("LR = 0.01\n=", "LR = 0.001\n=")


@pytest.fixture(autouse=True)
def _no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NIGHTLAB_LLM_BASE_URL", "NIGHTLAB_LLM_MODEL", "NIGHTLAB_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def proposer(server: ScriptedOpenAI, memory_tokens: int = 4000, **overrides: object) -> LLMProposer:
    config = LLMSection(
        **({"base_url": server.base_url, "model": "test-model", "max_retries": 2} | overrides)
    )
    return LLMProposer(config, memory_tokens=memory_tokens)


def context(**overrides: object) -> ProposalContext:
    values: dict = {
        "program": PROGRAM,
        "files": {"train.py": TRAIN},
        "metric_name": "val_bpb",
        "goal": "minimize",
        "best_metric": 1.25,
        "noise": 0.004,
        "history": [],
    }
    return ProposalContext(**(values | overrides))


def test_good_answer_gives_a_proposal_with_blocks_usage_and_cost(tmp_path: Path) -> None:
    reply = Reply(GOOD, prompt_tokens=1200, completion_tokens=80)
    with ScriptedOpenAI([reply]) as server:
        llm = proposer(server, input_price_per_mtok=3.0, output_price_per_mtok=15.0, temperature=0.2)
        assert isinstance(llm, Proposer) and llm.name == "llm"
        proposal = llm.propose(context())
    assert proposal.description == "double the learning rate"
    assert proposal.rationale.startswith("the loss still falls steeply")
    assert proposal.patch_format == "search_replace"
    assert proposal.patch == "train.py\n<<<<<<< SEARCH\nLR = 0.01\n=======\nLR = 0.02\n>>>>>>> REPLACE\n"
    assert (proposal.usage.prompt_tokens, proposal.usage.completion_tokens) == (1200, 80)
    assert proposal.usage.cost_usd == pytest.approx(1200 * 3.0 / 1e6 + 80 * 15.0 / 1e6)
    (request,) = server.requests
    assert request["model"] == "test-model" and request["temperature"] == 0.2
    assert [m["role"] for m in request["messages"]] == ["system", "user"]
    assert "<<<<<<< SEARCH" in request["messages"][0]["content"]
    (tmp_path / "train.py").write_text(TRAIN)
    assert apply_patch(tmp_path, proposal.patch, "search_replace", ["train.py"]) == {
        "train.py": TRAIN.replace("0.01", "0.02")
    }


def test_malformed_answer_is_re_asked_with_the_error_in_the_conversation() -> None:
    with ScriptedOpenAI([STALE, GOOD]) as server:
        proposal = proposer(server).propose(context())
    assert proposal.description == "double the learning rate"
    assert len(server.requests) == 2
    retry = server.requests[1]["messages"]
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    assert retry[2]["content"] == STALE
    assert "SEARCH text was not found in train.py" in retry[3]["content"]
    assert "LR = 0.01" in retry[3]["content"]  # the closest real line, to copy
    sent = [r["usage"] for r in server.responses]
    assert proposal.usage.prompt_tokens == sum(u["prompt_tokens"] for u in sent)
    assert proposal.usage.completion_tokens == sum(u["completion_tokens"] for u in sent)


def test_answers_that_stay_malformed_come_back_as_a_proposal_the_loop_rejects(tmp_path: Path) -> None:
    answers = ["I think we should raise the learning rate.", STALE, ""]
    with ScriptedOpenAI(answers) as server:
        proposal = proposer(server).propose(context())
    assert len(server.requests) == 3  # the first answer and max_retries=2 re-asks
    assert "no SEARCH/REPLACE blocks found" in server.requests[1]["messages"][-1]["content"]
    assert "SEARCH text was not found" in server.requests[2]["messages"][-1]["content"]
    assert proposal.rationale.startswith("unusable after 3 answer(s): the answer was empty")
    assert proposal.description
    (tmp_path / "train.py").write_text(TRAIN)
    with pytest.raises(EditError):
        apply_patch(tmp_path, proposal.patch, "search_replace", ["train.py"])


def test_last_stale_answer_keeps_its_description_and_fails_in_the_loop(tmp_path: Path) -> None:
    with ScriptedOpenAI([STALE], default=STALE) as server:
        proposal = proposer(server).propose(context())
    assert proposal.description == "double the learning rate"
    assert "SEARCH text was not found in train.py" in proposal.rationale
    (tmp_path / "train.py").write_text(TRAIN)
    with pytest.raises(EditError, match="SEARCH text was not found in train.py"):
        apply_patch(tmp_path, proposal.patch, "search_replace", ["train.py"])


def test_missing_description_is_re_asked_but_a_sound_change_still_runs() -> None:
    no_description = GOOD.split("\n", 1)[1]
    with ScriptedOpenAI([no_description], default=no_description) as server:
        proposal = proposer(server, max_retries=1).propose(context())
    assert len(server.requests) == 2
    assert "no `DESCRIPTION: ...` line" in server.requests[1]["messages"][-1]["content"]
    assert proposal.description == "change to train.py"
    assert "unusable" not in proposal.rationale


def test_prompt_holds_program_files_goal_and_the_runs_memory() -> None:
    history = [
        PastExperiment(1, "wider MLP", "discard", 1.31, reason="worse than best"),
        PastExperiment(2, "cosine schedule", "keep", 1.25),
        PastExperiment(3, "remove norm", "crash", None, reason="NaN loss at step 40"),
        PastExperiment(4, "warmup 100 steps", "discard", 1.27),
        PastExperiment(5, "bigger batch", "discard", 1.40),
    ]
    ctx = context(history=history, last_invalid_reason="block 1: SEARCH text occurs 2 times in train.py")
    with ScriptedOpenAI([GOOD]) as server:
        proposer(server).propose(ctx)
    prompt = server.requests[0]["messages"][1]["content"]
    assert PROGRAM in prompt
    assert f"train.py\n```\n{TRAIN}```" in prompt
    assert "Minimize `val_bpb`. Current best: 1.25" in prompt and "Noise floor: 0.004" in prompt
    assert "5 experiments; best val_bpb 1.25 (#2: cosine schedule)" in prompt
    # the kept change leads, the crash is remembered with its cause, every experiment is there
    assert prompt.find("cosine schedule") < prompt.find("NaN loss at step 40") < prompt.find("bigger batch")
    assert "- #1 discard 1.31: wider MLP - worse than best" in prompt
    assert "SEARCH text occurs 2 times in train.py" in prompt


def test_files_containing_fences_get_a_longer_fence() -> None:
    readme = "Example:\n```\ncode\n```\n"
    with ScriptedOpenAI([GOOD]) as server:
        proposer(server).propose(context(files={"train.py": TRAIN, "notes.md": readme}))
    assert f"notes.md\n````\n{readme}````" in server.requests[0]["messages"][1]["content"]


def test_environment_overrides_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    with ScriptedOpenAI([GOOD]) as server:
        monkeypatch.setenv("NIGHTLAB_LLM_BASE_URL", server.base_url)
        monkeypatch.setenv("NIGHTLAB_LLM_MODEL", "env-model")
        monkeypatch.setenv("NIGHTLAB_LLM_API_KEY", "sk-env")
        LLMProposer(LLMSection(base_url="http://127.0.0.1:9/v1", model="toml-model")).propose(context())
    assert server.requests[0]["model"] == "env-model"
    assert server.headers[0]["authorization"] == "Bearer sk-env"


def test_api_key_comes_from_the_configured_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_PROVIDER_KEY", "sk-mine")
    with ScriptedOpenAI([GOOD]) as server:
        config = LLMSection(base_url=server.base_url, model="m", api_key_env="MY_PROVIDER_KEY")
        LLMProposer(config).propose(context())
    assert server.headers[0]["authorization"] == "Bearer sk-mine"


def test_configuration_and_endpoint_errors_are_clear() -> None:
    with pytest.raises(LLMError, match=r"no LLM model configured.*NIGHTLAB_LLM_MODEL"):
        LLMProposer(LLMSection(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(LLMError, match="no API key.*OPENAI_API_KEY"):
        LLMProposer(LLMSection(model="gpt-x"))
    failing = ScriptedOpenAI([Reply("model 'test-model' does not exist", status=404)])
    expected = r"LLM request to http://127\.0\.0\.1:\d+/v1 \(model test-model\) failed.*does not exist"
    with failing as server, pytest.raises(LLMError, match=expected) as refused:
        proposer(server).propose(context())
    assert not isinstance(refused.value, ProposerUnavailable)  # a wrong model name does not heal by waiting


def test_an_endpoint_that_is_down_is_an_outage_the_loop_can_wait_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm, "_TRANSPORT_RETRIES", 0)
    down = ScriptedOpenAI(default=Reply("overloaded", status=503))
    with down as server, pytest.raises(LLMUnavailable, match="failed: Error code: 503"):
        proposer(server).propose(context())
    closed = LLMProposer(LLMSection(base_url="http://127.0.0.1:9/v1", model="m"))
    with pytest.raises(ProposerUnavailable, match="Connection error"):
        closed.propose(context())


def test_a_long_history_stays_within_the_memory_budget() -> None:
    history = [PastExperiment(i, f"try {i} " + "word " * 40, "discard", float(i)) for i in range(1, 400)]
    with ScriptedOpenAI([GOOD]) as server:
        llm_proposer = proposer(server, memory_tokens=600)
        llm_proposer.propose(context(history=history))
    prompt = server.requests[0]["messages"][1]["content"]
    memory = prompt.split("# Experiments so far\n", 1)[1].split("\n\n# ", 1)[0]
    assert llm_proposer.count(memory) <= 600 and "399 experiments" in memory


def test_a_reply_can_be_computed_from_the_request() -> None:
    def answer(body: dict) -> str:
        prompt = body["messages"][1]["content"]
        depth = int(prompt.split("DEPTH = ")[1].split()[0])
        return GOOD.replace("LR = 0.01\n=======\nLR = 0.02", f"DEPTH = {depth}\n=======\nDEPTH = {depth + 1}")

    with ScriptedOpenAI(default=answer) as server:
        proposal = proposer(server).propose(context())
    assert "DEPTH = 5" in proposal.patch


def test_a_transient_server_error_is_retried_by_the_client() -> None:
    with ScriptedOpenAI([Reply("overloaded", status=503), GOOD]) as server:
        proposal = proposer(server).propose(context())
    assert proposal.description == "double the learning rate" and len(server.requests) == 2


def test_prompt_shows_what_worked_on_other_machines_only_when_known() -> None:
    line = "H100 (calibration 4): val_bpb 1.1 (normalised 1.1) with commit abc: deeper model"
    assert line in llm.build_user_prompt(context(elsewhere=[line]), 4000, len)
    assert "other machines" not in llm.build_user_prompt(context(), 4000, len)


def test_prompt_names_the_candidates_running_on_other_workers() -> None:
    prompt = llm.build_user_prompt(context(running=["double the LR", "deeper model"]), 4000, len)
    assert "# Running now on other workers\n- double the LR\n- deeper model" in prompt
    assert "Running now" not in llm.build_user_prompt(context(), 4000, len)
