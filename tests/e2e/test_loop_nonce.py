"""Every execution of a commit draws a nonce that its train, evaluate and held-out phases share.

A harness that must tell this execution's output from anything an earlier experiment left in the scratch
paths (finetune names its checkpoint after it) relies on three things: each phase of one execution sees the
same `NIGHTLAB_NONCE`, no two executions see the same one, and setup sees none.
"""

from __future__ import annotations

from nightlab.research.journal import Journal
from nightlab.research.loop import ResearchLoop, RunOptions
from tests.research.loop_workspace import make_workspace, replace_block

# Scores run/model.json like the template's harness, but only when training wrote this execution's nonce;
# the nonce rides along as extra numbers (its first 48 bits) so the test can see it.
SCORE = '''"""Score run/model.json if run/nonce holds this phase's nonce, and sign the result."""

import json
import os
import sys
from pathlib import Path

from evaluate import loss

from nightlab.harness import read_key, reexec_without_key, sign_metrics

reexec_without_key()
key = read_key()
nonce = os.environ["NIGHTLAB_NONCE"]
if Path("run/nonce").read_text() != nonce:
    print("FAIL: run/nonce is not this execution's")
    sys.exit(1)
model = json.loads(Path("run/model.json").read_text())
value = loss(model["knobs"], int(model["seed"]), sys.argv[1])
print(sign_metrics({"loss": value, "nonce": int(nonce[:12], 16)}, key))
'''


def test_phases_of_one_execution_share_a_nonce_that_no_other_execution_sees(tmp_path):
    root = make_workspace(
        tmp_path,
        config={
            "experiment": {
                "setup": 'test -z "${NIGHTLAB_NONCE:-}"',
                "command": 'python train.py && printf %s "$NIGHTLAB_NONCE" > run/nonce',
                "evaluate": "python score.py val",
                "heldout": "python score.py test",
            },
            "metric": {"extra": ["nonce"]},
            "decide": {"baseline_runs": 2},
        },
        files={"score.py": SCORE},
        patches={"1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="LR")},
    )
    ResearchLoop(root, RunOptions(tag="n", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    run = journal.find_run("n")
    rows, heldout = journal.experiments(run.id), journal.heldout(run.id)
    journal.close()
    assert [r.decision for r in rows] == ["keep", "keep", "keep"], [r.reason for r in rows]
    nonces = [r.extra["nonce"] for r in rows]
    assert len(set(nonces)) == len(nonces) and all(n > 0 for n in nonces)
    assert {h.label for h in heldout} == {"baseline", "best"}
    assert all(h.test is not None for h in heldout), heldout
