"""Helpers for running tinker-cookbook recipes, unmodified, against `nightlab serve` started as a real
process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

API_KEY = "tml-cookbook-test"
# What the cookbook needs to run offline and quietly: a tml- key, no telemetry, no hub, no wandb; and a proxy
# that is a closed local port for anything but loopback, so what it would fetch (0.6.1 asks the docs site for
# model prices, and logs token counts alone without them) fails at once on this machine.
_NOWHERE = "http://127.0.0.1:9"
OFFLINE_ENV = {
    "TINKER_API_KEY": API_KEY,
    "TINKER_TELEMETRY": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    **{name: _NOWHERE for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    **{name: "127.0.0.1,localhost" for name in ("NO_PROXY", "no_proxy")},
}


def cookbook_data() -> Path:
    """The cookbook's own example_data folder (imported here, not at module level, so a missing cookbook
    skips)."""
    import tinker_cookbook

    return Path(tinker_cookbook.__file__).parent / "example_data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV}


@contextmanager
def nightlab_serve(data_dir: Path, log: Path, model: Path, timeout_s: float = 180.0) -> Iterator[str]:
    """`python -m nightlab.cli serve` on a free port, allowing the `model` directory; yields its base URL once
    /api/v1/healthz answers."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "nightlab.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--device",
        "cpu",
        "--allow-model",
        str(model),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, (
                f"nightlab serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, (
                f"nightlab serve not ready after {timeout_s} s:\n{log.read_text()[-3000:]}"
            )
            try:
                if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cookbook_command(recipe: str, **options: object) -> list[str]:
    """`python -m tinker_cookbook.recipes.<recipe>` with chz `key=value` options."""
    return [
        sys.executable,
        "-m",
        f"tinker_cookbook.recipes.{recipe}",
        *(f"{k}={v}" for k, v in options.items()),
    ]


def start_cookbook(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def run_cookbook(cmd: list[str], log: Path, timeout_s: float = 420.0) -> None:
    """Run a recipe to the end; fail with the tail of its output unless it exits 0."""
    proc = start_cookbook(cmd, log)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(
            f"{' '.join(cmd[2:4])} did not finish in {timeout_s} s:\n{log.read_text()[-4000:]}"
        ) from None
    assert rc == 0, f"{' '.join(cmd[2:4])} exited {rc}:\n{log.read_text()[-4000:]}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def server_checkpoint_paths(url: str) -> set[str]:
    """Every checkpoint the server lists for our key, through the tinker SDK's REST client."""
    import tinker

    rest = tinker.RestClient(base_url=url, api_key=API_KEY)
    return {c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints}
