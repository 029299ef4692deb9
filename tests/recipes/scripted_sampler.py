"""A scripted stand-in for the service's `/v1/completions` over real HTTP, playing a base model that knows
some answers but, like any untrained base model, never closes its thinking by itself.

`think(question) -> (thinking, answer)` scripts the model. Without `budget_forcing` a completion is the
thinking alone (it never writes `</think>`); with it, the reply is what the service's sampler makes of that
model: the thinking, then the forced `end_thinking` + `answer_prefix`, then the answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request

from nightlab.train.api.background import serve_in_thread

Think = Callable[[str], tuple[str, int]]


class ScriptedSampler:
    def __init__(self, tokenizer, questions: list[str], think: Think) -> None:
        self.tokenizer, self.questions, self.think = tokenizer, questions, think
        self.requests: list[dict[str, Any]] = []
        self.url = ""

    def complete(self, prompt: list[int], forcing: dict[str, Any] | None) -> str:
        text = self.tokenizer.decode(prompt)
        question = next(q for q in self.questions if q in text)
        thinking, answer = self.think(question)
        if forcing is None or forcing.get("max_thinking_tokens") is None:
            return thinking
        return f"{thinking}{forcing['end_thinking']}{forcing['answer_prefix']}{answer}."

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request) -> dict[str, Any]:
            body = await request.json()
            self.requests.append(body)
            prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            n = body.get("n") or 1
            texts = [self.complete(p, body.get("budget_forcing")) for p in prompts for _ in range(n)]
            return {
                "id": f"cmpl-{len(self.requests)}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {"index": i, "text": t, "logprobs": None, "finish_reason": "length"}
                    for i, t in enumerate(texts)
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }

        return app

    @contextmanager
    def serving(self) -> Iterator[ScriptedSampler]:
        with serve_in_thread(self.app()) as server:
            self.url = server.url
            yield self
