"""The llm proposer's model reads before it answers: function calls over real HTTP to a scripted server."""

from __future__ import annotations

from pathlib import Path

from nightlab.research.proposers.base import PastExperiment
from nightlab.research.proposers.llm import LLMProposer, LLMSection
from tests.fakes.scripted_openai import Reply, ScriptedOpenAI
from tests.research.test_llm_proposer import GOOD, TRAIN, context

BLOCKS = GOOD.split("\n\n", 1)[1]  # the SEARCH/REPLACE part of a good answer


def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / ".nightlab" / "logs" / "night").mkdir(parents=True)
    (root / "train.py").write_text(TRAIN)
    (root / "prepare.py").write_text("VOCAB = 256  # the harness\n")
    (root / ".nightlab" / "journal.sqlite").write_text("the journal")
    (root / ".nightlab" / "logs" / "night" / "0003.log").write_text("step 40: loss is nan\n")
    (root / "data").mkdir()
    (root / "data" / "test.bin").write_text("held-out")
    return root


def proposer(server: ScriptedOpenAI, root: Path, **settings: object) -> LLMProposer:
    config = LLMSection(base_url=server.base_url, model="m", max_retries=0, **settings)
    return LLMProposer(config, workspace=root, hidden=[root / "data"])


HISTORY = [
    PastExperiment(2, "cosine schedule", "keep", 1.25, patch="-LR = 0.1\n+LR = 0.01\n"),
    PastExperiment(3, "remove norm", "crash", None, reason="NaN loss at step 40"),
]


def tool_results(request: dict) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] == "tool"]


def test_the_model_reads_files_and_experiments_then_submits(tmp_path):
    root = workspace(tmp_path)
    script = [
        Reply(tool_calls=[("list_files", {})]),
        Reply(
            tool_calls=[
                ("read_file", {"path": "prepare.py"}),
                ("read_file", {"path": ".nightlab/journal.sqlite"}),
                ("read_file", {"path": "data/test.bin"}),
                ("read_experiment", {"number": 3}),
                ("search_history", {"text": "lr ="}),
            ]
        ),
        Reply(tool_calls=[("submit_proposal", {"description": "double the LR", "blocks": BLOCKS})]),
    ]
    ctx = context(history=HISTORY, log_path=root / ".nightlab" / "logs" / "night" / "0004.log")
    with ScriptedOpenAI(script) as server:
        proposal = proposer(server, root).propose(ctx)
    assert proposal.description == "double the LR" and "LR = 0.02" in proposal.patch
    assert server.requests[0]["tools"] and "tools" in server.requests[0]
    listing = tool_results(server.requests[1])[0]
    assert "train.py" in listing and "(read-only)" not in listing.split("train.py")[1].split("\n")[0]
    assert "prepare.py" in listing and ".nightlab" not in listing and "test.bin" not in listing
    harness, journal, split, crash, search = tool_results(server.requests[2])[1:]  # after the listing
    assert harness == "VOCAB = 256  # the harness\n"
    assert journal.startswith("error:") and split.startswith("error:")
    assert "NaN loss at step 40" in crash and "step 40: loss is nan" in crash
    assert "cosine schedule" in search and "remove norm" not in search
    assert proposal.usage.prompt_tokens > 0


def test_an_endpoint_without_function_calling_gets_the_one_shot_prompt(tmp_path):
    def refuse_tools(body: dict) -> Reply:
        return Reply("tools are not supported by this model", status=400) if "tools" in body else Reply(GOOD)

    with ScriptedOpenAI(default=refuse_tools) as server:
        llm = proposer(server, workspace(tmp_path))
        first, second = llm.propose(context()), llm.propose(context())
    assert first.description == second.description == "double the learning rate"
    assert ["tools" in r for r in server.requests] == [True, False, False]  # asked once, then never again


def test_tool_rounds_are_bounded_then_the_model_must_answer(tmp_path):
    script = [Reply(tool_calls=[("list_files", {})])] * 2 + [Reply(GOOD)]
    with ScriptedOpenAI(script) as server:
        proposal = proposer(server, workspace(tmp_path), tool_turns=2).propose(context())
    assert proposal.description == "double the learning rate"
    last = server.requests[-1]
    assert "tools" not in last and last["messages"][-1]["content"].startswith("No more tool calls")


def test_a_bad_tool_call_gets_an_error_the_model_can_read(tmp_path):
    script = [
        Reply(tool_calls=[("read_file", {"path": "../../etc/passwd"}), ("no_such_tool", {})]),
        Reply(GOOD),
    ]
    with ScriptedOpenAI(script) as server:
        proposer(server, workspace(tmp_path)).propose(context())
    escape, unknown = tool_results(server.requests[1])
    assert escape.startswith("error: ../../etc/passwd is not a file you may read")
    assert unknown.startswith("error: no tool 'no_such_tool'")
