"""The kit a template's harness uses to hand nightlab a number it can trust.

For each evaluation nightlab draws a fresh key, passes it in NIGHTLAB_METRIC_KEY, and believes only a metric
line signed with it (`sign_metrics`; nightlab.research.metrics verifies). The key must stay out of reach of
the code under test: `reexec_without_key` takes it out of the process's environment block and `read_key`
picks it up again. A harness that must run the code under test (to load a model defined in train.py) runs it
in a `ModelWorker`: another process, without the key, jailed by bubblewrap where that works (`worker_jail`),
that answers batches through a pipe (`serve_model` is its side). The probes (`ProbePlan`) check that its
answers are causal and treat the rows of a batch independently.

Nothing here imports numpy or torch when the module loads: `reexec_without_key` must run before they do.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import importlib.util
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch

KEY_ENV = "NIGHTLAB_METRIC_KEY"
SIGNED_PREFIX = "NIGHTLAB_METRIC"
_KEY_FD_ENV = "NIGHTLAB_METRIC_KEY_FD"  # the pipe `reexec_without_key` leaves the key in

# ---------------------------------------------------------------------------------------------------------
# The signed metric line.


def signature(payload: str, key: str) -> str:
    """HMAC-SHA256 of `payload` under `key`, in hex: the last field of a signed line."""
    return hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest()


def sign_metrics(metrics: Mapping[str, float], key: str) -> str:
    """The one line a harness prints to report metrics: `NIGHTLAB_METRIC <json> <hmac-sha256 hex>`.

    Values are written as floats with the names sorted and no spaces, so equal metrics sign equally."""
    payload = json.dumps(
        {name: float(v) for name, v in metrics.items()}, sort_keys=True, separators=(",", ":")
    )
    return f"{SIGNED_PREFIX} {payload} {signature(payload, key)}"


# ---------------------------------------------------------------------------------------------------------
# The key: out of the environment block before the code under test could look for it.


def no_memory_access() -> None:
    """Linux: make this process non-dumpable, so that a process of the same user cannot read its memory
    (/proc/PID/mem, environ, fds) without CAP_SYS_PTRACE. Elsewhere a no-op. An exec undoes it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4


def reexec_without_key() -> None:
    """Run this same command again without the key in its environment; the key follows through a pipe.

    Deleting the key from os.environ does not scrub the environment block the process started with
    (/proc/self/environ); an exec starts a fresh one. Call this first thing, before numpy or torch load: the
    old block then holds the key for milliseconds, and the step pays for one torch import, not two. Returns
    at once when there is no key in the environment (as after the re-exec)."""
    if KEY_ENV not in os.environ:
        return
    no_memory_access()
    read_end, write_end = os.pipe()
    os.write(write_end, os.environ.pop(KEY_ENV).encode())
    os.close(write_end)
    os.set_inheritable(read_end, True)
    env = {**os.environ, _KEY_FD_ENV: str(read_end)}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def read_key() -> str | None:
    """This evaluation's key, None outside `nightlab run`: from the pipe `reexec_without_key` left, else taken
    out of os.environ (a harness called in process). Makes the process non-dumpable again first."""
    no_memory_access()
    fd = os.environ.pop(_KEY_FD_ENV, None)
    if fd is not None:
        with os.fdopen(int(fd), "r") as pipe:
            return pipe.read() or None
    return os.environ.pop(KEY_ENV, None)


# ---------------------------------------------------------------------------------------------------------
# The model worker. Messages both ways are a kind byte, an 8-byte little-endian length and raw bytes;
# nothing is unpickled. Harness to worker: H (hello, JSON), W (weights), then X (a request) per batch.
# Worker to harness: R (ready) once, then L (an answer) per request; E (an error, text) ends it.

_WORKER_ENV = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "PYTHONUNBUFFERED")
_WORKER_ENV_PREFIXES = ("CUDA_", "NVIDIA_", "HIP_", "ROCR_", "OMP_", "MKL_", "TORCH_", "PYTORCH_")


class WorkerError(RuntimeError):
    """The model worker failed, hung or broke the protocol; the message says which."""


def _worker_env(scratch: Path, jailed: bool, keep: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """A minimal environment for the worker, never the key: the system and accelerator variables, those
    starting with a `keep` prefix, `extra`, and `scratch` as its temporary dir (and home, when jailed)."""
    prefixes = _WORKER_ENV_PREFIXES + keep
    env = {k: v for k, v in os.environ.items() if k in _WORKER_ENV or k.startswith(prefixes)}
    env.update(extra, TMPDIR=str(scratch))
    env["HOME"] = str(scratch) if jailed else os.environ.get("HOME", str(scratch))
    return env


def worker_jail(
    scratch: Path, hidden: Iterable[Path], needed: Iterable[Path], network: bool = False
) -> tuple[list[str], str]:
    """The bwrap prefix that jails the worker, and a note for the summary; no prefix where bwrap cannot run.

    The jail sees the file system read-only except `scratch`, without the `hidden` paths (save those that hold
    a `needed` one, Python or this kit); a minimal /dev plus the GPUs; its own user, PID, IPC, UTS and (unless
    `network`) network namespaces; no capabilities. (Nested in nightlab's own jail, bwrap can make no new
    /proc; the user namespace alone keeps the worker from reading other processes' memory or
    /proc/PID/root.)"""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return [], "off (bwrap not found)"
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--bind", str(scratch), str(scratch)]
    args += ["--unshare-user", "--unshare-ipc", "--unshare-uts", "--unshare-pid"]
    args += [] if network else ["--unshare-net"]
    args += ["--die-with-parent", "--cap-drop", "ALL"]
    for pattern in ("nvidia*", "dri", "kfd"):  # GPUs; the new /dev has only null, zero, random and the like
        for dev in sorted(Path("/dev").glob(pattern)):
            args += ["--dev-bind", str(dev), str(dev)]
    keep = [Path(p).resolve() for p in (*needed, sys.executable, __file__, scratch)]
    for path in (Path(p).expanduser().resolve() for p in hidden):
        if any(k.is_relative_to(path) for k in keep):
            continue
        if path.is_dir():
            args += ["--tmpfs", str(path), "--remount-ro", str(path)]
        elif path.exists():
            args += ["--ro-bind", "/dev/null", str(path)]
    error = ""
    for extra in (["--disable-userns"], []):  # no user namespaces inside, where this bwrap can do that
        try:
            probe = subprocess.run([*args, *extra, "--", "true"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [], f"off (bwrap could not run: {exc})"
        if probe.returncode == 0:
            return [*args, *extra, "--"], "on (bubblewrap)"
        error = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
    return [], f"off (bwrap cannot build a jail here: {error})"


class ModelWorker:
    """The harness's side of a jailed model worker: `argv`, whose main calls `serve_model` to import `code`,
    runs with a minimal environment (no key) in a scratch folder, inside `worker_jail` where bwrap works
    (`sandbox` says whether it does). Its process group is killed when a reply is late, malformed or over
    `max_message` bytes, and on close."""

    def __init__(
        self,
        argv: list[str],
        *,
        code: Path,
        hidden: Iterable[Path],
        needed: Iterable[Path] = (),
        keep_env: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        max_message: int,
    ):
        self.code, self.max_message = code, max_message
        self._scratch = tempfile.TemporaryDirectory(prefix="nightlab-worker-")
        scratch = Path(self._scratch.name)
        jail, self.sandbox = worker_jail(scratch, hidden, [code, *needed])
        try:
            self.proc = subprocess.Popen(
                [*jail, *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=_worker_env(scratch, bool(jail), keep_env, **(env or {})),
                start_new_session=True,
            )
        except OSError:
            self._scratch.cleanup()
            raise
        self.to_worker, self.from_worker = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.to_worker, False)
        os.set_blocking(self.from_worker, False)

    def __enter__(self) -> ModelWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, hello: dict, weights: bytes, *, limit: float) -> None:
        """Send `hello` and the weights; wait until the worker has imported `code` and loaded them."""
        self._begin(f"get ready (import {self.code.name} and load the checkpoint)", limit)
        self._send(b"H", json.dumps(hello).encode())
        self._send(b"W", weights)
        self._expect(b"R")

    def ask(self, request: bytes, *, limit: float) -> bytearray:
        """The worker's answer to one request (a batch)."""
        self._begin("answer a batch", limit)
        self._send(b"X", request)
        return self._expect(b"L")

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.proc.wait()
        self._scratch.cleanup()

    def _begin(self, what: str, limit: float) -> None:
        self.what, self.limit, self.deadline = what, limit, time.monotonic() + limit

    def _expect(self, kind: bytes) -> bytearray:
        got, payload = self._receive()
        if got == b"E":
            raise WorkerError(payload.decode(errors="replace"))
        if got != kind:
            raise WorkerError(f"unexpected message {got!r} from the model worker")
        return payload

    def _wait(self, fd: int, write: bool) -> None:
        waiting = ([], [fd]) if write else ([fd], [])
        if not any(select.select(*waiting, [], max(0.0, self.deadline - time.monotonic()))):
            raise WorkerError(f"the model worker did not {self.what} within {self.limit:g} s")

    def _gone(self) -> WorkerError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        code = self.proc.returncode
        status = "closed its output" if code is None else f"exited (status {code})"
        return WorkerError(f"the model worker {status} before it could {self.what}; its output is above")

    def _send(self, kind: bytes, payload: bytes) -> None:
        for part in (kind + len(payload).to_bytes(8, "little"), payload):
            view = memoryview(part)
            while view:
                self._wait(self.to_worker, write=True)
                try:
                    view = view[os.write(self.to_worker, view) :]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    raise self._gone() from None

    def _receive(self) -> tuple[bytes, bytearray]:
        head = self._read(9)
        size = int.from_bytes(head[1:], "little")
        if size > self.max_message:
            raise WorkerError(f"the model worker sent a message of {size} bytes")
        return bytes(head[:1]), self._read(size)

    def _read(self, size: int) -> bytearray:
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            self._wait(self.from_worker, write=False)
            try:
                n = os.readv(self.from_worker, [view[got:]])
            except BlockingIOError:
                continue
            if n == 0:
                raise self._gone()
            got += n
        return buf


Answer = Callable[[bytes], bytes]
"""The worker's reply to one request, both as raw bytes."""


def serve_model(code: Path, build: Callable[[ModuleType, dict, bytes], Answer]) -> None:
    """The worker's side, as its process's main: import `code` (train.py as module `train`; its `__main__`
    block does not run), let `build` make the model from it, the hello and the weights, then answer every
    request until the harness closes the pipe. The protocol uses the original stdin and stdout; whatever the
    code prints goes to stderr. Any error in the code under test is reported as a failed evaluation."""
    requests, answers = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    hello, weights = _read_message(requests, b"H"), _read_message(requests, b"W")
    if hello is None or weights is None:
        return
    try:
        answer = build(_import_file(code), json.loads(hello), weights)
    except Exception as exc:  # noqa: BLE001 - any error in the model code is a failed evaluation
        reason = f"could not build the model from {code.name} and the checkpoint: {type(exc).__name__}: {exc}"
        _write_message(answers, b"E", reason.encode())
        return
    _write_message(answers, b"R", b"")
    while (request := _read_message(requests, b"X")) is not None:
        try:
            reply = answer(request)
        except Exception as exc:  # noqa: BLE001
            _write_message(answers, b"E", f"evaluation failed: {type(exc).__name__}: {exc}".encode())
            return
        _write_message(answers, b"L", reply)


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _read_message(stream: BinaryIO, kind: bytes) -> bytes | None:
    """The worker's blocking side of the framing; None at the end of input."""
    head = stream.read(9)
    if len(head) < 9:
        return None
    payload = stream.read(int.from_bytes(head[1:], "little"))
    if head[:1] != kind:
        raise SystemExit(f"model worker: expected a {kind!r} message, got {head[:1]!r}")
    return payload


def _write_message(stream: BinaryIO, kind: bytes, payload: bytes) -> None:
    stream.write(kind + len(payload).to_bytes(8, "little"))
    stream.write(payload)
    stream.flush()


# ---------------------------------------------------------------------------------------------------------
# Probes: the same model call on a changed batch. Logits that should not move must stay within tolerance.

Logits = Callable[["torch.Tensor"], "torch.Tensor"]
"""Token ids (B, T) to float32 logits (B, T, vocab) on the CPU, wherever the model runs."""
Probe = Callable[[Logits, "torch.Tensor", "torch.Tensor", int, "torch.Generator"], "str | None"]


def _moved(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not a.allclose(b, rtol=1e-3, atol=1e-4, equal_nan=True)


def probe_future(
    logits: Logits, x: torch.Tensor, base: torch.Tensor, vocab: int, gen: torch.Generator
) -> str | None:
    """New tokens after a random position t of each row must not move that row's logits up to t."""
    import torch

    seq = x.shape[1]
    cuts = torch.randint(0, seq - 1, (x.shape[0],), generator=gen).tolist()
    probe = x.clone()
    for row, t in enumerate(cuts):
        probe[row, t + 1 :] = torch.randint(1, vocab, (seq - t - 1,), generator=gen)
    out = logits(probe)
    for row, t in enumerate(cuts):
        if _moved(out[row, : t + 1], base[row, : t + 1]):
            return (
                f"changing the tokens after position {t} of a row changed its logits at or before it "
                "(not causal)"
            )
    return None


def probe_rows(
    logits: Logits, x: torch.Tensor, base: torch.Tensor, vocab: int, gen: torch.Generator
) -> str | None:
    """Replacing one row of a batch must not move the logits of the others."""
    import torch

    changed = int(torch.randint(0, x.shape[0], (1,), generator=gen))
    probe = x.clone()
    probe[changed] = torch.randint(1, vocab, (x.shape[1],), generator=gen)
    out = logits(probe)
    for row in range(x.shape[0]):
        if row != changed and _moved(out[row], base[row]):
            return (
                f"changing row {changed} of a batch changed the logits of row {row} "
                "(rows must be scored independently)"
            )
    return None


def check_causality(logits: Logits, vocab: int, shape: tuple[int, int], trials: int = 2) -> str | None:
    """Both probes on seeded batches of random tokens, for a model run in process; why it fails, if so."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    for _ in range(trials):
        x = torch.randint(1, vocab, shape, generator=gen)
        base = logits(x)
        reason = probe_future(logits, x, base, vocab, gen) or probe_rows(logits, x, base, vocab, gen)
        if reason:
            return reason
    return None


class ProbePlan:
    """Probes spread over a pass through `batches` batches, at places drawn from `rng` that the model cannot
    predict: new future tokens twice and a replaced row once in the batch just scored, and new future tokens
    once in a batch of random tokens. A probe only ever shows the model tokens it was already asked to
    predict.

    The probes are answered by `probe_logits`, a second model that never saw the batches scored by
    `logits`: a model that remembers its earlier answers could otherwise give a probe the same (peeked)
    logits it gave the batch, and pass. Two processes that share nothing cannot agree on a logit that
    depends on tokens only one of them was shown."""

    def __init__(
        self,
        logits: Logits,
        vocab: int,
        shape: tuple[int, int],
        batches: int,
        rng: random.Random,
        probe_logits: Logits | None = None,
    ):
        import torch

        self.logits, self.vocab, self.shape = logits, vocab, shape
        self.probe_logits = probe_logits or logits
        self.gen = torch.Generator().manual_seed(rng.getrandbits(63))
        self.due: dict[
            int, list[tuple[Probe, bool]]
        ] = {}  # after how many batches -> (probe, on random tokens)
        plan = ((probe_future, False), (probe_future, False), (probe_rows, False), (probe_future, True))
        for probe, on_random in plan:
            self.due.setdefault(rng.randint(0 if on_random else 1, batches), []).append((probe, on_random))

    def run(self, done: int, last: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """The probes due after `done` batches, on `last` (the batch just scored and its logits) or on random
        tokens of `shape`; raises ValueError naming the first that fails."""
        import torch

        for probe, on_random in self.due.get(done, []):
            if on_random or last is None or last[0].shape[0] < 2:
                x = torch.randint(1, self.vocab, self.shape, generator=self.gen)
                base = (x, self.logits(x))
            else:
                base = last
            reason = probe(self.probe_logits, *base, self.vocab, self.gen)
            if reason:
                raise ValueError(reason)
