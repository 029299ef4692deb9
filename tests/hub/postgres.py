"""A real PostgreSQL server for the hub's tests, from the system's binaries (apt's `postgresql`).

It runs as the `postgres` user when the tests run as root (PostgreSQL refuses root), on a loopback port and
a private socket directory, with trust auth for the one local user; each test gets a database of its own.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

USER = "nightlab"
_names = itertools.count()


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(bin_dir: Path) -> Iterator[int]:
    """A running server for the block; its port."""
    base = Path(tempfile.mkdtemp(prefix="nightlab-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*run_as, *args], check=True, capture_output=True, text=True, timeout=120)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", USER)
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start")
        yield port
    finally:
        if data.exists():
            subprocess.run(
                [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(port: int) -> str:
    """A new empty database on the server; its SQLAlchemy URL."""
    import psycopg

    name = f"hub_{os.getpid()}_{next(_names)}"
    with psycopg.connect(f"host=127.0.0.1 port={port} user={USER} dbname=postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{name}"
