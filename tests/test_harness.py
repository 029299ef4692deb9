"""The harness kit: the signed metric line, the key out of the environment, the jailed model worker, the
probes; and device detection, which the harness and train.py share."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nightlab import hardware, harness
from nightlab.research.metrics import MetricError, read_signed_metrics

KEY = "k" * 64
SECRET = "s3cret-metric-key-value"


# --- the signed line ---------------------------------------------------------------------------------------


def test_a_signed_line_verifies_under_its_key_only():
    line = harness.sign_metrics({"val_bpb": 1.25, "eval_tokens": 16384}, KEY)
    prefix, payload, signature = line.split(" ")
    assert prefix == "NIGHTLAB_METRIC" and payload == '{"eval_tokens":16384.0,"val_bpb":1.25}'
    assert signature == harness.signature(payload, KEY)
    assert read_signed_metrics(f"noise\n{line}\n", KEY) == {"eval_tokens": 16384.0, "val_bpb": 1.25}
    with pytest.raises(MetricError, match="bad signature"):
        read_signed_metrics(line, "another key")
    assert harness.sign_metrics({"b": 1, "a": 2.0}, KEY) == harness.sign_metrics({"a": 2, "b": 1.0}, KEY)


# --- the key -----------------------------------------------------------------------------------------------

KEY_SCRIPT = """
import ctypes, json, os, sys
from pathlib import Path

starts = Path(sys.argv[1])
starts.write_text(starts.read_text() + "x")
from nightlab.harness import read_key, reexec_without_key

reexec_without_key()
key = read_key()
print(json.dumps({
    "starts": len(starts.read_text()),
    "key": key,
    "argv": sys.argv[2:],
    "environ_has_key": "SECRET" in Path("/proc/self/environ").read_text("latin-1"),
    "env_names": sorted(k for k in os.environ if k.startswith("NIGHTLAB_METRIC")),
    "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),
}))
"""


def _run_key_script(tmp_path: Path, key: str | None, *args: str) -> dict:
    script, starts = tmp_path / "step.py", tmp_path / "starts"
    script.write_text(KEY_SCRIPT.replace("SECRET", SECRET))
    starts.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTLAB_METRIC")}
    if key:
        env[harness.KEY_ENV] = key
    done = subprocess.run(
        [sys.executable, "-u", str(script), str(starts), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/environ and prctl are Linux's")
def test_the_key_leaves_the_environment_block_by_a_reexec(tmp_path):
    seen = _run_key_script(tmp_path, SECRET, "evaluate", "--split", "val")
    assert seen["starts"] == 2, "the step runs again, with the same arguments"
    assert seen["argv"] == ["evaluate", "--split", "val"]
    assert seen["key"] == SECRET
    assert not seen["environ_has_key"], "the process's environment block must no longer hold the key"
    assert seen["env_names"] == [], "neither the key nor the pipe's number is left in os.environ"
    assert seen["dumpable"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/environ and prctl are Linux's")
def test_without_a_key_the_step_runs_once_and_reads_none(tmp_path):
    seen = _run_key_script(tmp_path, None, "evaluate")
    assert seen["starts"] == 1 and seen["key"] is None


def test_a_harness_called_in_process_takes_the_key_from_the_environment(tmp_path):
    code = (
        "import os\nfrom nightlab import harness\nprint(harness.read_key(), os.environ.get(harness.KEY_ENV))"
    )
    env = {**os.environ, harness.KEY_ENV: SECRET}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.split() == [SECRET, "None"]


# --- the model worker --------------------------------------------------------------------------------------

WORKER = """
import sys
from pathlib import Path
from nightlab.harness import serve_model

serve_model(Path(sys.argv[1]), lambda module, hello, weights: module.make(hello, weights))
"""
MODEL = """
import os

print("model code printing at import, on what was stdout")


def make(hello, weights):
    prefix = hello["prefix"].encode() + weights

    def answer(request):
        if request == b"key?":
            return os.environ.get("NIGHTLAB_METRIC_KEY", "no key").encode()
        if request == b"big":
            return b"x" * (2 << 20)
        if request == b"boom":
            raise RuntimeError("a bad batch")
        return prefix + request

    return answer
"""


def _worker(tmp_path: Path, model_code: str, name: str = "model.py") -> harness.ModelWorker:
    (tmp_path / "worker.py").write_text(WORKER)
    code = tmp_path / name
    code.write_text(model_code)
    argv = [sys.executable, str(tmp_path / "worker.py"), str(code)]
    return harness.ModelWorker(
        argv, code=code, hidden=[], needed=[tmp_path / "worker.py"], max_message=1 << 20
    )


def test_the_worker_answers_over_its_pipe_without_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv(harness.KEY_ENV, SECRET)
    with _worker(tmp_path, MODEL) as worker:
        assert worker.sandbox.startswith(("on", "off"))
        worker.start({"prefix": "p:"}, b"w", limit=60)
        assert worker.ask(b"x", limit=30) == b"p:wx"
        assert worker.ask(b"key?", limit=30) == b"no key"
        with pytest.raises(harness.WorkerError, match="evaluation failed: RuntimeError: a bad batch"):
            worker.ask(b"boom", limit=30)


def test_a_worker_that_answers_too_much_is_stopped(tmp_path):
    with _worker(tmp_path, MODEL) as worker:
        worker.start({"prefix": ""}, b"", limit=60)
        with pytest.raises(harness.WorkerError, match="sent a message of 2097152 bytes"):
            worker.ask(b"big", limit=30)


def test_a_model_that_cannot_be_built_is_a_worker_error(tmp_path):
    with (
        _worker(tmp_path, "raise ImportError('no such layer')\n", "broken.py") as worker,
        pytest.raises(
            harness.WorkerError, match="could not build the model from broken.py and the checkpoint"
        ),
    ):
        worker.start({}, b"", limit=60)


def test_a_worker_that_hangs_is_killed_at_the_limit(tmp_path):
    start = time.monotonic()
    with (
        _worker(tmp_path, "import time\ntime.sleep(600)\n", "slow.py") as worker,
        pytest.raises(
            harness.WorkerError, match=r"did not get ready \(import slow.py and load the checkpoint\)"
        ),
    ):
        worker.start({}, b"", limit=2)
    assert worker.proc.returncode is not None and time.monotonic() - start < 60


JAIL_PROBE = """
import os, sys
from pathlib import Path

hidden, needed, scratch, outside = map(Path, sys.argv[1:5])
print("hidden", sorted(p.name for p in hidden.iterdir()))
print("needed", needed.read_text())
(scratch / "ok").write_text("x")
try:
    (outside / "planted").write_text("x")
    print("outside writable")
except OSError:
    print("outside read-only")
"""


def test_the_jail_hides_what_it_is_told_and_shows_what_is_needed(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.bin").write_text("secret")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "model.py").write_text("needed")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    hidden = [tmp_path / "splits", tmp_path / "tools"]  # tools holds a needed file, so it stays
    jail, note = harness.worker_jail(scratch, hidden, needed=[tmp_path / "tools" / "model.py"])
    if not jail:
        assert note.startswith("off (")
        pytest.skip(f"bwrap cannot build a jail here: {note}")
    assert note == "on (bubblewrap)"
    args = [tmp_path / "splits", tmp_path / "tools" / "model.py", scratch, tmp_path]
    done = subprocess.run(
        [*jail, sys.executable, "-c", JAIL_PROBE, *map(str, args)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["hidden []", "needed needed", "outside read-only"]
    assert (scratch / "ok").exists() and not (tmp_path / "planted").exists()


# --- the probes --------------------------------------------------------------------------------------------

VOCAB = 50


def _logits(mix: str):
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0))

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = table[x]
        if mix == "future":
            out = out + x.float().mean(dim=1, keepdim=True)[..., None]
        elif mix == "rows":
            out = out + 0.01 * x.roll(-1, dims=0)[:, :1, None].float()
        return out

    return logits


def test_probes_pass_a_causal_model_and_name_the_leak_of_one_that_is_not():
    shape = (4, 32)
    assert harness.check_causality(_logits("none"), VOCAB, shape) is None
    assert "not causal" in harness.check_causality(_logits("future"), VOCAB, shape)
    assert "rows must be scored independently" in harness.check_causality(_logits("rows"), VOCAB, shape)


@pytest.mark.parametrize(
    ("mix", "caught"), [("none", None), ("future", "not causal"), ("rows", "scored independently")]
)
def test_a_probe_plan_runs_every_probe_once_over_a_pass(mix, caught):
    calls = []
    inner = _logits(mix)

    def logits(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return inner(x)

    plan = harness.ProbePlan(logits, VOCAB, (4, 32), batches=5, rng=random.Random(7))
    assert sum(len(probes) for probes in plan.due.values()) == 4
    gen = torch.Generator().manual_seed(1)
    last = None
    try:
        for done in range(6):
            plan.run(done, last)
            x = torch.randint(1, VOCAB, (4, 32), generator=gen)
            last = (x, logits(x))
    except ValueError as exc:
        assert caught and caught in str(exc)
    else:
        assert caught is None


# --- device detection --------------------------------------------------------------------------------------


def test_pick_device_honours_a_request_and_agrees_with_accelerator():
    assert hardware.pick_device("cpu") == torch.device("cpu")
    found = hardware.pick_device()
    assert (None if found.type == "cpu" else found.type) == hardware.accelerator()
