"""Serve an ASGI app from a background thread on a free loopback port: for harnesses, benchmarks and tests
that talk to the service over real HTTP from the same process."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn


@dataclass
class BackgroundServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(app, host: str = "127.0.0.1", start_timeout: float = 60.0) -> BackgroundServer:
    """Start uvicorn on an OS-chosen port (bound here, so no other process can take it first)."""
    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start within {start_timeout:.0f} s")
        time.sleep(0.05)
    return BackgroundServer(f"http://{host}:{sock.getsockname()[1]}", server, thread)
