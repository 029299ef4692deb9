"""Where nightlab keeps caches, and how paths in `nightlab.toml` expand, in one place for loop and sandbox."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "NIGHTLAB_CACHE_DIR"


def cache_dir() -> Path:
    """Data sets, tokenizers and probes templates prepare: $NIGHTLAB_CACHE_DIR, else ~/.cache/nightlab."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nightlab").expanduser()


def expand(entry: str) -> str:
    """`~` and `$VARS` expanded; `${NIGHTLAB_CACHE_DIR}` always means the cache, set in the environment or
    not."""
    env = {**os.environ, CACHE_ENV: str(cache_dir())}
    path = os.path.expanduser(entry)
    for name in sorted(env, key=len, reverse=True):
        path = path.replace("${" + name + "}", env[name]).replace("$" + name, env[name])
    return path
