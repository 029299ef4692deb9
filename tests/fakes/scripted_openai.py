"""A scripted OpenAI-compatible chat server over real HTTP, standing in for an external LLM provider.

    with ScriptedOpenAI(replies=["DESCRIPTION: ...", ...]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        ...
        server.requests[0]["messages"]  # what the client sent
        server.headers[0]["authorization"]  # and how it authenticated

Each reply is a string (the answer text), a `Reply` (to set the status or token counts), or a callable that
receives the request body and returns either, for answers that depend on the prompt. When the queue is
empty the `default` reply is used; without one the server answers 400 saying the script ran out.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class Reply:
    """One scripted answer; token counts default to word counts of the prompt and of the answer."""

    content: str = ""
    status: int = 200
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: list[tuple[str, dict[str, Any]]] | None = None  # (function name, arguments) to call


Script = str | Reply | Callable[[dict[str, Any]], "str | Reply"]


def _words(messages: list[dict[str, Any]]) -> int:
    return sum(len(str(m.get("content") or "").split()) for m in messages)


def _message(reply: Reply, turn: int) -> dict[str, Any]:
    """The assistant message of a reply: its text, or its function calls."""
    if not reply.tool_calls:
        return {"role": "assistant", "content": reply.content}
    calls = [
        {
            "id": f"call-{turn}-{i}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for i, (name, args) in enumerate(reply.tool_calls)
    ]
    return {"role": "assistant", "content": None, "tool_calls": calls}


class ScriptedOpenAI:
    """Serves `/v1/chat/completions` from a queue of scripted replies and records every request."""

    def __init__(
        self, replies: Iterable[Script] = (), default: Script | None = None, model: str = "scripted"
    ):
        self.replies: deque[Script] = deque(replies)
        self.default = default
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.responses: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    def _next(self, body: dict[str, Any], headers: dict[str, str]) -> Reply | None:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            script = self.replies.popleft() if self.replies else self.default
        if script is None:
            return None
        if callable(script):
            script = script(body)
        return Reply(script) if isinstance(script, str) else script

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "nightlab"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            reply = self._next(body, dict(request.headers))
            if reply is None:
                error = {"message": "ScriptedOpenAI: no scripted reply left", "type": "invalid_request_error"}
                return JSONResponse({"error": error}, status_code=400)
            if reply.status != 200:
                error = {
                    "message": reply.content or f"scripted status {reply.status}",
                    "type": "server_error",
                }
                return JSONResponse({"error": error}, status_code=reply.status)
            prompt = (
                reply.prompt_tokens if reply.prompt_tokens is not None else _words(body.get("messages", []))
            )
            completion = (
                reply.completion_tokens if reply.completion_tokens is not None else len(reply.content.split())
            )
            response = {
                "id": f"chatcmpl-scripted-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": [
                    {
                        "index": 0,
                        "message": _message(reply, len(self.requests)),
                        "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
            self.responses.append(response)
            return JSONResponse(response)

        return app

    def __enter__(self) -> ScriptedOpenAI:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # the OS picks a free port; binding first leaves no race
        port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("ScriptedOpenAI: the server did not start")
            time.sleep(0.01)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
