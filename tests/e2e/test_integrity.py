"""Tampering, end to end: each attack is a proposal replayed through the loop against a small workspace.

Every test asserts the decision and the reason the journal recorded. The attacks are written so that they
would win if they worked (a perfect score, the optimum knobs), and fall back to honest work when they fail, so
"the metric is unaffected" is a real check. The noise and held-out guarantees are in test_integrity_noise.py.
"""

from __future__ import annotations

import json
import shutil
import socketserver
import sqlite3
import threading
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.config import ExperimentSection
from nightlab.harness import sign_metrics
from nightlab.research.journal import EXPERIMENT_COLUMNS, ChainError, Experiment, Journal, _canonical_hash
from nightlab.research.live import LiveView
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.research.sandbox import detect
from tests.research.loop_workspace import commit_all, git, make_workspace, replace_block

runner = CliRunner()
needs_bwrap = pytest.mark.skipif(
    not detect().available, reason=f"bubblewrap cannot build a sandbox here: {detect().reason}"
)

OPTIMUM = {"LEARNING_RATE": 0.05, "WIDTH": 16.0, "MOMENTUM": 0.9}
KNOBS = '    knobs = {"LEARNING_RATE": LEARNING_RATE, "WIDTH": WIDTH, "MOMENTUM": MOMENTUM}'
SECRET_SPLIT = "test_split.txt"  # a harness file hidden as the test split; it holds the optimum


def attack(description: str, code: str) -> str:
    """A patch that runs `code` in training right after the knobs are chosen; `code` may replace them."""
    return replace_block(KNOBS, KNOBS + "\n" + code, description=description)


# An evaluator that signs a perfect score with whatever key it is given.
CHEAT = (
    "import hashlib, hmac, os\n"
    "payload = '{\"loss\":0.0}'\n"
    "key = os.environ.get('NIGHTLAB_METRIC_KEY', '')\n"
    "print('NIGHTLAB_METRIC ' + payload + ' ' + "
    "hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest())\n"
)
WRITE_HARNESS = attack(
    "rewrite the evaluator",
    f"""    try:
        Path("evaluate.py").write_text({CHEAT!r})
        print("ATTACK harness: rewritten")
    except OSError as exc:
        print(f"ATTACK harness: {{exc}}")""",
)
READ_JOURNAL = attack(
    "read and plant into the journal",
    """    try:
        print(f"ATTACK journal read: {len(Path('.nightlab/journal.sqlite').read_bytes())} bytes")
    except OSError as exc:
        print(f"ATTACK journal read: {exc}")
    try:
        Path(".nightlab/planted").write_text("x")
        print("ATTACK journal write: planted")
    except OSError as exc:
        print(f"ATTACK journal write: {exc}")""",
)
READ_SPLIT = attack(
    "peek at the test split",
    f'''    try:
        secret = Path("{SECRET_SPLIT}").read_text()
        print(f"ATTACK split: {{secret!r}}")
        if secret:
            knobs = json.loads(secret)
    except OSError as exc:
        print(f"ATTACK split: {{exc}}")''',
)
USE_NETWORK = attack(
    "ask a server for the answer",
    """    import socket
    try:
        with socket.create_connection(("127.0.0.1", int(os.environ["HOST_PORT"])), timeout=5) as conn:
            knobs = json.loads(conn.makefile().readline())
        print("ATTACK network: connected")
    except OSError as exc:
        print(f"ATTACK network: {exc}")""",
)
# A worker that leaves the process group and, after training, keeps rewriting the model with the optimum.
WORKER = f"""
import json, os, pathlib, time
time.sleep(0.5)
beat = pathlib.Path(os.environ["BEATS"]) / "worker"
for _ in range(100):
    beat.write_text("alive")
    pathlib.Path("run/model.json").write_text(json.dumps({{"knobs": {OPTIMUM!r}, "seed": 42}}))
    time.sleep(0.02)
"""
OUTLIVE = attack(
    "keep working after training ends",
    f"""    import subprocess, sys
    subprocess.Popen([sys.executable, "-c", {WORKER!r}], start_new_session=True)""",
)


class _Answers(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        self.wfile.write((json.dumps(OPTIMUM) + "\n").encode())


@pytest.fixture
def answer_server():
    """A server on the host's loopback that hands out the optimum to whoever connects."""
    server = socketserver.TCPServer(("127.0.0.1", 0), _Answers)
    server.connections = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _rows(root: Path, tag: str) -> list[Experiment]:
    journal = Journal.for_workspace(root)
    try:
        return journal.experiments(journal.find_run(tag).id)
    finally:
        journal.close()


def _by_description(rows: list[Experiment]) -> dict[str, Experiment]:
    return {r.description: r for r in rows if r.kind == "candidate"}


def _log(row: Experiment) -> str:
    return Path(row.log_path).read_text()


def _attack_workspace(tmp: Path, mode: str, patches: dict[str, str], port: int) -> Path:
    beats = tmp / "beats"
    return make_workspace(
        tmp,
        config={
            "experiment": {"heldout": None, "env": {"HOST_PORT": str(port), "BEATS": str(beats)}},
            "decide": {"baseline_runs": 2},
            "sandbox": {"mode": mode, "eval_hidden": [SECRET_SPLIT], "writable": [str(beats)]},
        },
        files={SECRET_SPLIT: json.dumps(OPTIMUM)},
        patches=patches,
    )


# --- 1. the sandbox ----------------------------------------------------------------------------------------


@needs_bwrap
def test_sandboxed_attacks_fail_inside_and_leave_the_metric_alone(tmp_path, answer_server):
    patches = {
        "1.md": WRITE_HARNESS,
        "2.md": READ_JOURNAL,
        "3.md": READ_SPLIT,
        "4.md": USE_NETWORK,
        "5.md": OUTLIVE,
    }
    root = _attack_workspace(tmp_path, "required", patches, answer_server.server_address[1])
    harness = (root / "evaluate.py").read_text()
    state = ResearchLoop(root, RunOptions(tag="jail", proposer="replay")).run_loop()
    assert state.sandboxed and state.keeps == 0
    rows = _rows(root, "jail")
    honest = rows[0].metric  # the first baseline run: same knobs, same seed as every attack's first run
    attacks = _by_description(rows)
    assert len(attacks) == 5
    for row in attacks.values():
        assert row.decision == "discard" and "within the noise" in row.reason, row.reason
        assert row.metric == honest and row.sandboxed == 1
        assert row.sandbox_reason.startswith("sandboxed by bubblewrap")
    assert "ATTACK harness: [Errno 30] Read-only file system" in _log(attacks["rewrite the evaluator"])
    journal_log = _log(attacks["read and plant into the journal"])
    assert "ATTACK journal read: [Errno 2] No such file or directory" in journal_log
    assert "ATTACK journal write: [Errno 30] Read-only file system" in journal_log
    split_log = _log(attacks["peek at the test split"])  # the file is covered by /dev/null
    assert "ATTACK split: ''" in split_log or "ATTACK split: [Errno 13] Permission denied" in split_log
    assert "ATTACK network: [Errno 111] Connection refused" in _log(attacks["ask a server for the answer"])
    assert answer_server.connections == 0
    assert not (tmp_path / "beats" / "worker").exists()  # the worker died with the jail before it woke up
    assert (root / "evaluate.py").read_text() == harness and not (root / ".nightlab" / "planted").exists()
    journal = Journal.for_workspace(root)
    assert journal.verify_chain() == len(rows) + 1
    journal.close()


def test_without_the_sandbox_the_same_attacks_reach_their_targets(tmp_path, answer_server):
    """What the sandbox is for; only the harness rewrite is still caught (by the harness check after
    training)."""
    patches = {"1.md": WRITE_HARNESS, "2.md": READ_JOURNAL, "3.md": READ_SPLIT, "4.md": USE_NETWORK}
    root = _attack_workspace(tmp_path, "off", patches, answer_server.server_address[1])
    state = ResearchLoop(root, RunOptions(tag="open", proposer="replay")).run_loop()
    assert not state.sandboxed and state.sandbox_reason == 'unsandboxed: [sandbox] mode = "off"'
    attacks = _by_description(_rows(root, "open"))
    harness = attacks["rewrite the evaluator"]
    assert harness.decision == "invalid"
    assert harness.reason == (
        "the training phase tampered with the harness: harness files changed since the run started: "
        "evaluate.py"
    )
    assert "ATTACK journal read:" in _log(attacks["read and plant into the journal"])
    assert "bytes" in _log(attacks["read and plant into the journal"])
    assert attacks["peek at the test split"].decision == "keep"  # the hidden split was readable
    assert "ATTACK network: connected" in _log(attacks["ask a server for the answer"])
    assert answer_server.connections == 1
    assert all(r.sandboxed == 0 for r in attacks.values())


def test_required_sandbox_without_bwrap_stops_before_anything_runs(tmp_path, monkeypatch):
    root = make_workspace(
        tmp_path,
        config={"sandbox": {"mode": "required"}},
        patches={"1.md": replace_block("WIDTH = 4", "WIDTH = 8")},
    )
    monkeypatch.setenv("NIGHTLAB_BWRAP", "/nonexistent/bwrap")
    result = runner.invoke(app, ["run", "-C", str(root), "--proposer", "replay"])
    assert result.exit_code == 1
    assert "[sandbox] mode = \"required\" but bwrap '/nonexistent/bwrap' not found" in result.output
    assert "apt-get install bubblewrap" in result.output
    assert git(root, "rev-parse", "--abbrev-ref", "HEAD") == "main" and not (root / ".nightlab").exists()


def test_an_unsandboxed_run_says_so_in_the_live_view_the_journal_and_the_report(tmp_path, monkeypatch):
    root = make_workspace(
        tmp_path,
        config={"sandbox": {"mode": "auto"}, "decide": {"baseline_runs": 2}, "experiment": {"heldout": None}},
        patches={"1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05")},
    )
    monkeypatch.setenv("NIGHTLAB_BWRAP", "/nonexistent/bwrap")
    result = runner.invoke(app, ["run", "-C", str(root), "--tag", "bare", "--proposer", "replay"])
    assert result.exit_code == 0, result.output
    reason = "unsandboxed: bwrap '/nonexistent/bwrap' not found or not executable"
    assert f"sandbox off ({reason}" in result.output
    rows = _rows(root, "bare")
    assert len(rows) == 3 and all(r.sandboxed == 0 and r.sandbox_reason.startswith(reason) for r in rows)
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", "-C", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"**sandbox: off for 3 of 3 journal rows: {reason}" in (out / "report.md").read_text()
    # The live panel keeps saying it for as long as the run goes on.
    console = Console(file=StringIO(), force_terminal=True, width=200)
    view = LiveView(console)
    view._state.sandboxed, view._state.sandbox_reason = False, rows[0].sandbox_reason
    console.print(view.__rich__())
    assert reason in console.file.getvalue()


# --- 2. the metric channel ---------------------------------------------------------------------------------

# A harness step that imports the editable module before it scores, as an evaluator of model code must.
SCORE = '''"""Score the knobs of run/model.json after importing train.py, and sign the result."""

import json
import os
from pathlib import Path

from evaluate import loss

from nightlab.harness import sign_metrics


def main():
    key = os.environ.pop("NIGHTLAB_METRIC_KEY")
    import train  # noqa: F401  (editable code runs from here on, without the key in the environment)

    model = json.loads(Path("run/model.json").read_text())
    print(sign_metrics({"loss": loss(model["knobs"], int(model["seed"]), "val")}, key))


if __name__ == "__main__":
    main()
'''
OTHER_KEY_RECORD = sign_metrics({"loss": 0.0}, "a key of another evaluation")
SPEAK = """SEED = 42

import atexit as _atexit
import hashlib as _hashlib
import hmac as _hmac

_KEY = os.environ.get("NIGHTLAB_METRIC_KEY", "")
_PAYLOAD = '{"loss":0.0}'
print(f"KEY SEEN in {os.environ.get('NIGHTLAB_PHASE')}: {_KEY!r}")
print("loss: 0.0")
print("NIGHTLAB_METRIC " + _PAYLOAD + " " + "0" * 64)
# After the harness printed its own record: one signed with what this code could find, and an old one.
_SIGNED = _hmac.new(_KEY.encode(), _PAYLOAD.encode(), _hashlib.sha256).hexdigest()
_atexit.register(print, "NIGHTLAB_METRIC " + _PAYLOAD + " " + _SIGNED)
_atexit.register(print, OTHER_KEY_RECORD)
""".replace("OTHER_KEY_RECORD", repr(OTHER_KEY_RECORD))
SILENCE = """SEED = 42

if os.environ.get("NIGHTLAB_PHASE") == "evaluate":
    print('NIGHTLAB_METRIC {"loss":0.0} ' + "0" * 64)
    os._exit(0)  # the harness never gets to print its own record"""
OVERRUN = """def main() -> None:
    time.sleep(3)
    print("loss: 0.0")
    print('NIGHTLAB_METRIC {"loss":0.0} ' + "0" * 64)"""


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("channel")
    root = make_workspace(
        tmp,
        config={
            "experiment": {
                "evaluate": "python score.py",
                "heldout": None,
                "budget_seconds": 1.0,
                "budget_tolerance": 0.0,
                "startup_allowance_seconds": 1.0,
                "timeout_seconds": 20.0,
            },
            "decide": {"baseline_runs": 2},
            "sandbox": {"mode": "auto"},
        },
        files={"score.py": SCORE},
        patches={
            "1.md": replace_block("SEED = 42", SPEAK, description="speak for the harness"),
            "2.md": replace_block("SEED = 42", SILENCE, description="silence the harness"),
            "3.md": replace_block("def main() -> None:", OVERRUN, description="train past the budget"),
        },
    )
    state = ResearchLoop(root, RunOptions(tag="channel", proposer="replay")).run_loop()
    return state, _rows(root, "channel")


def test_printed_and_forged_metrics_are_ignored(channel_run):
    _, rows = channel_run
    row = _by_description(rows)["speak for the harness"]
    assert row.decision == "discard" and "within the noise" in row.reason
    assert row.metric == rows[0].metric  # the harness's own number, not 0.0
    log = _log(row)
    assert "KEY SEEN in train: ''" in log and "KEY SEEN in evaluate: ''" in log  # training never gets the key
    evaluate_part = log.split("=== evaluate:")[1]
    assert OTHER_KEY_RECORD in evaluate_part and 'NIGHTLAB_METRIC {"loss":0.0}' in evaluate_part


def test_without_the_harness_record_there_is_no_metric(channel_run):
    _, rows = channel_run
    row = _by_description(rows)["silence the harness"]
    assert row.decision == "crash" and row.metric is None
    assert row.reason == (
        "no usable metric: no signed NIGHTLAB_METRIC line in the evaluate output "
        "(1 line(s) with a bad signature were ignored)"
    )


# --- 3. the budget -----------------------------------------------------------------------------------------


def test_training_past_the_budget_is_an_overrun_whatever_it_prints(channel_run):
    state, rows = channel_run
    row = _by_description(rows)["train past the budget"]
    assert row.decision == "overrun" and row.metric is None
    assert row.reason.startswith("training took ") and "over the limit 2.0s" in row.reason
    assert "evaluate" not in row.timings  # never scored at all
    assert state.keeps == 0


# tinygpt on a CPU: 60 s of training plus a few seconds of imports and setup. The same proportions at 1/30
# of the time: a 2 s budget, 0.2 s of startup, and the default allowance scaled likewise.
SCALE = 2.0 / 60.0
SLOW_DOWN = replace_block(
    "def main() -> None:", "def main() -> None:\n    time.sleep(0.8)", description="train 40% past the budget"
)


def test_training_40_percent_past_the_budget_is_an_overrun_on_tinygpt_timings(tmp_path):
    allowance = ExperimentSection.model_fields["startup_allowance_seconds"].default * SCALE
    root = make_workspace(
        tmp_path,
        config={
            "experiment": {
                "heldout": None,
                "budget_seconds": 60 * SCALE,
                "timeout_seconds": 30.0,
                "startup_allowance_seconds": allowance,
                "env": {"QUADRATIC_WORK_SECONDS": "2.2"},
            },
            "decide": {"baseline_runs": 2},
        },
        patches={"1.md": SLOW_DOWN},
    )
    ResearchLoop(root, RunOptions(tag="slow", proposer="replay")).run_loop()
    rows = _rows(root, "slow")
    slowest = max(r.timings["train"] for r in rows if r.kind == "baseline")
    row = _by_description(rows)["train 40% past the budget"]
    assert row.decision == "overrun" and row.metric is None
    assert row.train_limit == pytest.approx(max(slowest, 2.0) + 0.05 * 2.0 + allowance)
    assert row.reason.startswith("training took ") and f"over the limit {row.train_limit:.1f}s" in row.reason


# --- 4. the journal ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def journal_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("journal")
    root = make_workspace(
        tmp,
        config={"decide": {"baseline_runs": 2}, "experiment": {"heldout": None}},
        patches={
            "1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="lower the LR"),
            "2.md": replace_block("SEED = 42", "SEED = 7", description="another seed"),
        },
    )
    ResearchLoop(root, RunOptions(tag="j", proposer="replay", max_experiments=1)).run_loop()
    return root


def _copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest, symlinks=True)
    return dest


def _sql(root: Path, statement: str) -> None:
    db = sqlite3.connect(root / ".nightlab" / "journal.sqlite")
    db.execute(statement)
    db.commit()
    db.close()


def _resume(root: Path):
    return runner.invoke(app, ["run", "-C", str(root), "--tag", "j", "--proposer", "replay"])


def test_an_edited_row_stops_the_next_run_naming_it(journal_run, tmp_path):
    root = _copy(journal_run, tmp_path / "ws")
    _sql(root, "UPDATE experiments SET decision = 'keep', metric = 0.0 WHERE number = 2")
    result = _resume(root)
    assert result.exit_code == 1
    assert (
        "journal chain broken at experiments row id=2 (run 1, experiment 2): its content was modified"
        in result.output
    )
    assert len(_rows(root, "j")) == 3  # nothing ran, nothing was added
    result = runner.invoke(app, ["status", "-C", str(root)])
    assert result.exit_code == 1 and "its content was modified" in result.output


def test_a_removed_last_row_is_detected(journal_run, tmp_path):
    root = _copy(journal_run, tmp_path / "ws")
    _sql(root, "DELETE FROM experiments WHERE number = 3")  # the kept change: the chain itself stays valid
    result = _resume(root)
    assert result.exit_code == 1
    assert (
        "journal chain broken at the end of experiments: it has 2 row(s) but journal.head records 3 ending "
        "at row id=3; rows were removed from the end"
    ) in result.output
    (root / ".nightlab" / "journal.head").unlink()
    result = _resume(root)
    assert result.exit_code == 1 and "journal.head is missing" in result.output


def test_a_replaced_last_row_is_detected(journal_run, tmp_path):
    """A forger who knows the hashing rule swaps the last row for a consistently re-chained better one."""
    root = _copy(journal_run, tmp_path / "ws")
    db = sqlite3.connect(root / ".nightlab" / "journal.sqlite")
    db.row_factory = sqlite3.Row
    last = dict(db.execute("SELECT * FROM experiments ORDER BY id DESC LIMIT 1").fetchone())
    db.execute("DELETE FROM experiments WHERE id = ?", (last["id"],))
    values = {c: last[c] for c in EXPERIMENT_COLUMNS} | {"metric": 0.0}
    values["prev_hash"] = last["prev_hash"]
    values["row_hash"] = _canonical_hash("experiments", values, last["prev_hash"])
    db.execute(
        f"INSERT INTO experiments ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
        list(values.values()),
    )
    db.commit()
    db.close()
    result = _resume(root)
    assert result.exit_code == 1
    assert (
        "journal chain broken at experiments row id=3: it is not the row journal.head recorded"
        in result.output
    )


JOURNAL_FORGERY = """def main() -> None:
    import sqlite3
    db = sqlite3.connect(".nightlab/journal.sqlite")
    db.execute("UPDATE experiments SET metric = 0.0 WHERE number = 1")
    db.commit()"""


def test_a_forgery_during_a_run_stops_it_after_that_experiment(tmp_path):
    root = make_workspace(
        tmp_path,
        config={"decide": {"baseline_runs": 2}, "experiment": {"heldout": None}},
        patches={
            "1.md": replace_block("def main() -> None:", JOURNAL_FORGERY, description="rewrite history"),
            "2.md": replace_block("WIDTH = 4", "WIDTH = 8", description="never reached"),
        },
    )
    with pytest.raises(
        ChainError, match=r"experiments row id=1 \(run 1, experiment 1\): its content was modified"
    ):
        ResearchLoop(root, RunOptions(tag="forge", proposer="replay")).run_loop()
    db = sqlite3.connect(root / ".nightlab" / "journal.sqlite")
    numbers = [n for (n,) in db.execute("SELECT number FROM experiments ORDER BY id")]
    db.close()
    assert numbers == [1, 2, 3]  # the forging experiment was recorded; the next one never ran
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""


# --- 5. workspace hygiene ----------------------------------------------------------------------------------

CACHE = f"""    Path("shortcut.json").write_text({json.dumps(OPTIMUM)!r})
    Path("run").mkdir(exist_ok=True)
    Path("run/shortcut.json").write_text({json.dumps(OPTIMUM)!r})"""
USE_CACHE = """    for cached in (Path("shortcut.json"), Path("run/shortcut.json")):
        if cached.exists():
            knobs = json.loads(cached.read_text())
    print(f"CACHE: {sorted(str(p) for p in Path('.').rglob('shortcut.json'))}")"""


def test_nothing_an_experiment_writes_reaches_the_next_one(tmp_path):
    root = make_workspace(
        tmp_path,
        config={"decide": {"baseline_runs": 2}, "experiment": {"heldout": None}},
        patches={
            "1.md": attack("leave a shortcut behind", CACHE),
            "2.md": attack("use a shortcut left behind", USE_CACHE),
        },
    )
    ResearchLoop(root, RunOptions(tag="clean", proposer="replay")).run_loop()
    all_rows = _rows(root, "clean")
    rows = _by_description(all_rows)
    leave, use = rows["leave a shortcut behind"], rows["use a shortcut left behind"]
    assert leave.decision == "invalid" and leave.reason == (
        "the training phase wrote shortcut.json outside the scratch paths (run/); a harness that needs "
        "such a place declares it under workspace.scratch"
    )
    assert use.decision == "discard" and "within the noise" in use.reason
    assert use.metric == all_rows[0].metric  # the honest first baseline run: no shortcut was found
    assert "CACHE: []" in _log(use)
    assert not (root / "shortcut.json").exists() and not (root / "run").exists()


# Trains with the optimum, then puts the honest knobs back into train.py: the journal's diff would show
# nothing but an extra line, while the score comes from code the diff does not hold.
REWRITE_ITSELF = attack(
    "train with other knobs than committed",
    f"""    knobs = {OPTIMUM!r}
    Path(__file__).write_text(Path(__file__).read_text() + "\\n# trained with other knobs\\n")""",
)


@pytest.mark.parametrize("mode", ["off", pytest.param("required", marks=needs_bwrap)])
def test_training_that_rewrites_the_committed_code_is_invalid(tmp_path, mode):
    root = make_workspace(
        tmp_path,
        config={"decide": {"baseline_runs": 2}, "experiment": {"heldout": None}, "sandbox": {"mode": mode}},
        patches={"1.md": REWRITE_ITSELF},
    )
    state = ResearchLoop(root, RunOptions(tag="self", proposer="replay")).run_loop()
    row = _by_description(_rows(root, "self"))["train with other knobs than committed"]
    assert row.decision == "invalid" and row.metric is None and state.keeps == 0
    assert row.reason == (
        "the training phase changed the committed code (train.py), so the code scored would not be the code "
        "the journal records"
    )
    assert "evaluate" not in row.timings


def test_editable_globs_that_reach_the_harness_are_refused_at_start(tmp_path):
    root = make_workspace(
        tmp_path,
        config={"workspace": {"editable": ["*.py"]}},
        patches={"1.md": replace_block("WIDTH = 4", "WIDTH = 8")},
    )
    result = runner.invoke(app, ["run", "-C", str(root), "--proposer", "replay"])
    assert result.exit_code == 1
    assert (
        "workspace.editable ['*.py'] matches evaluate.py, named by the harness step experiment.evaluate "
        "('python evaluate.py --split val'); the agent must not be able to change it"
    ) in " ".join(result.output.split())
    assert git(root, "rev-parse", "--abbrev-ref", "HEAD") == "main"


def test_an_editable_path_through_a_symlink_out_of_the_workspace_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = make_workspace(
        tmp_path,
        config={
            "workspace": {"editable": ["train.py", "lib/*.py"]},
            "decide": {"baseline_runs": 2},
            "experiment": {"heldout": None},
        },
        patches={
            "1.md": "# description: add a helper module\nlib/helper.py\n<<<<<<< SEARCH\n=======\n"
            "X = 1\n>>>>>>> REPLACE\n"
        },
    )
    (root / "lib").symlink_to(outside, target_is_directory=True)
    commit_all(root, "a lib dir that lives elsewhere")
    ResearchLoop(root, RunOptions(tag="link", proposer="replay")).run_loop()
    row = _by_description(_rows(root, "link"))["add a helper module"]
    assert row.decision == "invalid" and row.commit_sha is None
    assert "lib/helper.py goes through a symlink (lib); only regular files inside the workspace" in row.reason
    assert list(outside.iterdir()) == []


def test_a_symlinked_editable_file_is_refused_at_start(tmp_path):
    elsewhere = tmp_path / "elsewhere.py"
    root = make_workspace(tmp_path, patches={"1.md": replace_block("WIDTH = 4", "WIDTH = 8")})
    elsewhere.write_text((root / "train.py").read_text())
    (root / "train.py").unlink()
    (root / "train.py").symlink_to(elsewhere)
    commit_all(root, "train.py lives elsewhere")
    result = runner.invoke(app, ["run", "-C", str(root), "--proposer", "replay"])
    assert result.exit_code == 1
    assert "editable path train.py is a symlink; editable files must be regular files" in result.output
    assert not (root / ".nightlab" / "logs").exists()


# --- the checks gate ---------------------------------------------------------------------------------------

CHECK = '''"""Harness gate: a learning rate under 0.1 is known to diverge on the real problem."""
import sys

import train

sys.exit(0 if train.LEARNING_RATE >= 0.1 else 1)
'''


def test_a_gain_that_fails_the_checks_is_not_kept(tmp_path):
    root = make_workspace(
        tmp_path,
        config={"experiment": {"checks": "python check.py", "heldout": None}, "decide": {"baseline_runs": 2}},
        files={"check.py": CHECK},
        patches={
            "1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description="a lower LR"),
            "2.md": replace_block("MOMENTUM = 0.5", "MOMENTUM = 0.9", description="more momentum"),
        },
    )
    state = ResearchLoop(root, RunOptions(tag="gate", proposer="replay")).run_loop()
    rows = _by_description(_rows(root, "gate"))
    lower, momentum = rows["a lower LR"], rows["more momentum"]
    assert lower.decision == "discard" and lower.reason == "checks failed (exited with code 1)"
    assert lower.sigmas > 100 and "checks" in lower.timings
    assert momentum.decision == "keep" and state.best_commit == momentum.commit_sha
