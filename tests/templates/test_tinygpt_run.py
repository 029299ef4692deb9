"""tinygpt end to end on a tiny model: train.py's summary and checkpoint, and the signed evaluate step, whose
model worker runs train.py in a separate process that holds no key (and, with bwrap, sees no split)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time

import pytest

from tests.templates.tinygpt_support import TINY, env_for, make_workspace, run_py, summary, write_corpus

KEY = "test-key-0123456789"
SIGNED = re.compile(r"^NIGHTLAB_METRIC (\{.*\}) ([0-9a-f]{64})$", re.MULTILINE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace copy with prepared data and one short by-hand training run."""
    root = tmp_path_factory.mktemp("tinygpt_run")
    write_corpus(root / "corpus")
    ws = make_workspace(root)
    env = env_for(root / "cache", root / "corpus", **TINY)
    prep = run_py(ws, ["prepare.py"], env)
    assert prep.returncode == 0, prep.stderr
    run = run_py(ws, ["train.py"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    return ws, env, run


@pytest.fixture(scope="module")
def honest(trained):
    """The signed metrics of the unmodified train.py, and the evaluate step's output."""
    ws, env, _ = trained
    done = _evaluate(ws, env, "--split", "val", key=KEY)
    assert done.returncode == 0, done.stdout + done.stderr
    records = _verified(done.stdout + done.stderr)
    assert len(records) == 1
    return records[0], done


def _evaluate(ws, env, *extra: str, key: str | None = None, **more_env: str):
    env = {**env, **more_env}
    if key:
        env["NIGHTLAB_METRIC_KEY"] = key
    return run_py(ws, ["prepare.py", "evaluate", *extra], env)


def _verified(text: str) -> list[dict]:
    """The metric records in `text` whose signature verifies under KEY."""

    def valid(payload: str, signature: str) -> bool:
        return hmac.compare_digest(
            signature, hmac.new(KEY.encode(), payload.encode(), hashlib.sha256).hexdigest()
        )

    return [json.loads(payload) for payload, signature in SIGNED.findall(text) if valid(payload, signature)]


def _variant(ws, name: str, code: str):
    """train.py plus extra code appended, saved next to it for `--train-file`."""
    path = ws / name
    path.write_text((ws / "train.py").read_text() + "\n\n" + code)
    return path


def _sandbox(done) -> str:
    return re.search(r"^worker_sandbox: (.*)$", done.stdout, re.MULTILINE).group(1)


def test_train_prints_a_parseable_summary_and_saves_a_checkpoint(trained):
    ws, _, run = trained
    numbers = summary(run.stdout)
    for name in (
        "val_bpb",
        "training_seconds",
        "total_seconds",
        "peak_memory_mb",
        "mfu_percent",
        "total_tokens_M",
        "num_steps",
        "num_params_M",
        "depth",
    ):
        assert name in numbers, f"{name} missing from the summary"
    assert numbers["depth"] == 1 and numbers["num_steps"] >= 2  # one untimed warm-up step, then timed ones
    assert numbers["training_seconds"] >= 2 and 0 < numbers["val_bpb"] < 20
    assert (ws / "run" / "checkpoint.pt").stat().st_size > 0
    config = json.loads((ws / "run" / "model.json").read_text())["config"]
    assert config["n_layer"] == 1 and config["n_embd"] == 32


def test_evaluate_signs_the_same_score_as_evaluate_bpb_in_process(trained, honest):
    ws, env, run = trained
    metrics, done = honest
    payload = SIGNED.search(done.stdout).group(1)
    assert payload == json.dumps(metrics, sort_keys=True, separators=(",", ":"))
    assert set(metrics) == {"val_bpb", "eval_seconds", "eval_tokens"}
    assert f"val_bpb: {metrics['val_bpb']:.6f}" in done.stdout
    assert _sandbox(done).startswith(("on", "off"))
    in_process = run_py(
        ws,
        [
            "-c",
            (
                "import json, torch, prepare, train\n"
                "config = json.loads(open('run/model.json').read())['config']\n"
                "model = train.GPT(train.GPTConfig(**config))\n"
                "model.load_state_dict(torch.load('run/checkpoint.pt', weights_only=True))\n"
                "print(repr(prepare.evaluate_bpb(model, 'val')))\n"
            ),
        ],
        env,
    )
    assert in_process.returncode == 0, in_process.stderr
    assert metrics["val_bpb"] == pytest.approx(float(in_process.stdout), rel=1e-5)
    assert metrics["val_bpb"] == pytest.approx(summary(run.stdout)["val_bpb"], abs=2e-6)


def test_evaluate_without_a_key_prints_only_the_human_line(trained):
    ws, env, _ = trained
    done = _evaluate(ws, env, "--split", "test")
    assert done.returncode == 0, done.stderr
    assert "NIGHTLAB_METRIC" not in done.stdout
    assert re.search(r"^val_bpb: \d+\.\d+$", done.stdout, re.MULTILINE)


def test_train_py_finds_no_key_and_its_forgeries_do_not_verify(trained, honest):
    ws, env, _ = trained
    spy = _variant(
        ws,
        "train_spy.py",
        (  # walks every frame above it for a key, as it could in one process
            "import hashlib as _hl, hmac as _hm, json as _js, os as _os, pathlib as _pl, sys as _sys\n"
            "_found, _frame = [], _sys._getframe()\n"
            "while _frame is not None:\n"
            "    _found += [v for v in {**_frame.f_globals, **_frame.f_locals}.values()"
            " if isinstance(v, str)]\n"
            "    _frame = _frame.f_back\n"
            "_found += [_os.environ.get('NIGHTLAB_METRIC_KEY', ''),"
            " _pl.Path('/proc/self/environ').read_text('latin-1')]\n"
            "print('SPY saw', len(_found), 'strings:', _found, flush=True)\n"
            "_payload = _js.dumps({'eval_seconds': 1.0, 'eval_tokens': 1, 'val_bpb': 0.001},\n"
            "                     sort_keys=True, separators=(',', ':'))\n"
            "for _k in _found:\n"
            "    _sig = _hm.new(_k.encode(), _payload.encode(), _hl.sha256).hexdigest()\n"
            "    print('NIGHTLAB_METRIC', _payload, _sig)\n"
        ),
    )
    done = _evaluate(ws, env, "--split", "val", "--train-file", str(spy), key=KEY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SPY saw" in done.stderr and "SPY saw" not in done.stdout, "the worker's prints go to the log only"
    assert KEY not in done.stdout + done.stderr
    assert 'val_bpb":0.001' in done.stderr  # the forgeries were printed, but none verifies
    [record] = _verified(done.stdout + done.stderr)  # the harness's own, on its stdout
    assert _verified(done.stdout) == [record] and record["val_bpb"] == pytest.approx(
        honest[0]["val_bpb"], rel=1e-9
    )


@pytest.mark.parametrize(
    "patch",
    [
        (
            "import __main__\n__main__.evaluate_bpb = lambda *a, **k: 0.0\n"
            "__main__.batch_loss = lambda *a, **k: (0.0, 1, 1)\n"
        ),
        "import torch.nn.functional\ntorch.nn.functional.cross_entropy = lambda *a, **k: a[0].sum() * 0\n",
        (
            "import json as _json, numpy as _np\n_loads = _json.loads\n"
            "def _inflate(s, *a, **k):\n"
            "    out = _loads(s, *a, **k)\n"
            "    return [v * 10 for v in out] if isinstance(out, list) else out\n"
            "_json.loads = _inflate\n_np.memmap = lambda *a, **k: _np.zeros(10**6, dtype=_np.uint16)\n"
        ),
        (
            "import pathlib as _pl\n"
            "try:\n    _pl.Path('run/checkpoint.pt').write_bytes(b'not the trained weights')\n"
            "except OSError as _exc:\n    print('SPY could not overwrite the checkpoint:', _exc)\n"
        ),
    ],
    ids=["evaluator", "torch", "json-numpy", "checkpoint"],
)
def test_patches_made_by_train_py_do_not_change_the_score(trained, honest, patch):
    ws, env, _ = trained
    cheat = _variant(ws, "train_cheat.py", patch)
    saved = (ws / "run" / "checkpoint.pt").read_bytes()
    try:
        done = _evaluate(ws, env, "--train-file", str(cheat), key=KEY)
    finally:
        (ws / "run" / "checkpoint.pt").write_bytes(saved)
    assert done.returncode == 0, done.stdout + done.stderr
    [metrics] = _verified(done.stdout)
    assert metrics["val_bpb"] == pytest.approx(honest[0]["val_bpb"], rel=1e-9)
    assert metrics["eval_tokens"] == honest[0]["eval_tokens"]


def test_the_worker_sees_no_validation_data(trained):
    ws, env, _ = trained
    spy = _variant(
        ws,
        "train_reader.py",
        (  # looks for the splits directly, in the raw data, and through /proc
            "import glob as _glob, os as _os\n"
            "_cache = _os.path.join(_os.environ['NIGHTLAB_CACHE_DIR'], 'tinygpt')\n"
            "_splits = _glob.glob(_cache + '/val/**/*.bin', recursive=True)\n"
            "_splits += _glob.glob(_cache + '/test/**/*.bin', recursive=True)\n"
            "_raw = _glob.glob(_os.environ['TINYGPT_DATA'] + '/*')\n"
            "_proc, _mem = [], []\n"
            "for _pid in filter(str.isdigit, _os.listdir('/proc')):\n"
            "    try:\n"
            "        _proc += _glob.glob(f'/proc/{_pid}/root{_cache}/val/*/*.bin')\n"
            "        if b'evaluate' in open(f'/proc/{_pid}/cmdline', 'rb').read():\n"
            "            _mem.append(open(f'/proc/{_pid}/mem', 'rb').name)\n"
            "    except OSError:\n"
            "        pass\n"
            "print('SPY splits', len(_splits), 'raw', len(_raw), 'via /proc', len(_proc),"
            " 'harness memory', len(_mem))\n"
        ),
    )
    done = _evaluate(ws, env, "--train-file", str(spy), key=KEY)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = re.search(r"SPY splits (\d+) raw (\d+) via /proc (\d+) harness memory (\d+)", done.stderr)
    assert seen, done.stderr
    if not _sandbox(done).startswith("on"):
        pytest.skip(
            f"bwrap cannot jail the model worker here (worker_sandbox: {_sandbox(done)}); "
            "unsandboxed it can read the splits"
        )
    assert seen.groups() == ("0", "0", "0", "0")


@pytest.mark.parametrize(
    ("leak", "refusal"),
    [
        # every logit sees the mean of the whole row, future tokens included
        ("out + idx.float().mean(dim=1, keepdim=True)[..., None]", r"not causal"),
        # causal within a row, but each row sees the next row's first token
        (
            "out + 0.01 * idx.roll(-1, dims=0)[:, :1, None].float()",
            r"changing row \d+ of a batch changed the logits of row \d+",
        ),
    ],
    ids=["looks-ahead", "reads-other-rows"],
)
def test_evaluate_rejects_a_model_that_sees_what_it_predicts(trained, leak, refusal):
    ws, env, _ = trained
    leaky = _variant(
        ws,
        "train_leaky.py",
        (
            "_forward = GPT.forward\n"
            "def _peek(self, idx, targets=None):\n"
            "    out = _forward(self, idx, targets)\n"
            f"    return {leak} if targets is None else out\n"
            "GPT.forward = _peek\n"
        ),
    )
    done = _evaluate(ws, env, "--train-file", str(leaky), key=KEY)
    assert done.returncode == 1
    assert re.search(rf"^FAIL: .*{refusal}", done.stdout, re.MULTILINE), done.stdout
    assert "NIGHTLAB_METRIC" not in done.stdout


# A model that peeks at the next input token and remembers its answers: every prefix it has seen gets the
# answer it got the first time, so re-sending a scored batch with another future cannot catch it.
REMEMBERING_PEEKER = """
import pickle as _pickle

_forward = GPT.forward
_memo = {}
_SHARED = [Path(d) / "nightlab-memo.pkl" for d in ("/tmp", "/dev/shm", Path.home())]


def _recall():
    for path in _SHARED:
        try:
            _memo.update(_pickle.loads(path.read_bytes()))
        except (OSError, ValueError, EOFError, _pickle.UnpicklingError):
            pass


def _share():
    for path in _SHARED:
        try:
            path.write_bytes(_pickle.dumps(_memo))
        except OSError:
            pass


def _remembered(self, idx, targets=None):
    out = _forward(self, idx, targets)
    if targets is not None:
        return out
    if SHARE_MEMO:
        _recall()
    out = out.clone()
    for b in range(idx.shape[0]):
        row = idx[b].tolist()
        for t in range(len(row)):
            key = hash(tuple(row[: t + 1]))
            if key not in _memo:
                answer = out[b, t].clone()
                if t + 1 < len(row):
                    answer[row[t + 1]] += 30.0
                _memo[key] = answer
            out[b, t] = _memo[key]
    if SHARE_MEMO:
        _share()
    return out


GPT.forward = _remembered
"""


@pytest.mark.parametrize("share", [False, True], ids=["in-memory", "shared-through-files"])
def test_a_model_that_peeks_and_remembers_its_answers_is_caught(trained, share):
    """The probes are answered by a second worker that never saw the scored batches; with `share` the model
    also tries to hand its memory to that worker through files (/tmp, /dev/shm, its home)."""
    ws, env, _ = trained
    code = f"SHARE_MEMO = {share}\n" + REMEMBERING_PEEKER
    done = _evaluate(ws, env, "--train-file", str(_variant(ws, f"train_memo_{share}.py", code)), key=KEY)
    sandbox = re.search(r"model worker: sandbox (.*)", done.stderr)
    if share and not (sandbox and sandbox.group(1).startswith("on")):
        pytest.skip(f"unsandboxed ({done.stderr.strip()}): two workers of one user share /tmp")
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"^FAIL: .*not causal", done.stdout, re.MULTILINE), done.stdout
    assert "NIGHTLAB_METRIC" not in done.stdout


def test_a_worker_that_hangs_is_killed_at_the_limit(trained):
    ws, env, _ = trained
    stuck = _variant(ws, "train_stuck.py", "import time as _time\n_time.sleep(600)\n")
    start = time.monotonic()
    done = _evaluate(ws, env, "--train-file", str(stuck), key=KEY, TINYGPT_WORKER_READY_SECONDS="3")
    assert done.returncode == 1
    assert (
        "FAIL: the model worker did not get ready (import train_stuck.py and load the checkpoint) within 3 s"
        in done.stdout
    )
    assert time.monotonic() - start < 60, "the worker must be killed, not waited for"
    assert "NIGHTLAB_METRIC" not in done.stdout


def test_a_diverging_run_ends_with_fail(trained):
    ws, env, _ = trained
    done = run_py(
        ws,
        ["train.py"],
        {**env, "TINYGPT_EMBED_LR": "1e30", "TINYGPT_HEAD_LR": "1e30", "NIGHTLAB_PHASE": "train"},
    )
    assert done.returncode == 1
    assert re.search(r"^FAIL: loss is .* \(diverged\)", done.stdout, re.MULTILINE)
