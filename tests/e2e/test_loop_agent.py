"""A whole run with the agent proposer: a scripted agent that edits well, then edits the harness, then hangs,
then deletes everything; the loop keeps the first, records the others as invalid, and goes on."""

from __future__ import annotations

from pathlib import Path

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from tests.research.loop_workspace import make_workspace

AGENT = """
n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}
case $n in
  0) echo "read the brief: $(head -c 18 .nightlab-brief.md)"
     sed -i 's/^LEARNING_RATE = 0.3/LEARNING_RATE = 0.05/' train.py
     echo 'lower the LR' > .nightlab-proposal.md ;;
  1) echo 'SCORE = 0' >> evaluate.py ;;
  2) sleep 600 ;;
  *) rm -rf ./* ./.[!.]* ;;
esac
"""


def test_the_loop_runs_a_scripted_agent_through_good_harness_hanging_and_destructive_edits(
    tmp_path: Path,
) -> None:
    script = tmp_path / "agent.sh"
    script.write_text(AGENT.format(count=tmp_path / "count"))
    config = {
        "proposer": {"kind": "agent"},
        "proposer.agent": {"command": f"bash {script}", "timeout_seconds": 5},
    }
    root = make_workspace(tmp_path, config=config)
    harness = (root / "evaluate.py").read_text()
    ResearchLoop(root, RunOptions(tag="agent", max_experiments=4)).run_loop()
    journal = Journal.for_workspace(root)
    rows = [r for r in journal.experiments(1) if r.kind == "candidate"]
    journal.close()
    assert [(r.decision, r.proposer) for r in rows] == [
        ("keep", "agent"),
        ("invalid", "agent"),
        ("invalid", "agent"),
        ("invalid", "agent"),
    ]
    assert "evaluate.py" in rows[1].description and "timed out" in rows[2].description
    assert (root / "evaluate.py").read_text() == harness
    assert "LEARNING_RATE = 0.05" in (root / "train.py").read_text()
    transcript = root / ".nightlab" / "logs" / "agent" / f"{rows[0].number:04d}.agent.log"
    assert transcript.read_text().startswith("read the brief: # Experiment brief")
