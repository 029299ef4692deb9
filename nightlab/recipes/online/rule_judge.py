"""A judge that grades by a rule, served as an OpenAI-compatible chat endpoint: the offline demo's stand-in
for an external LLM judge.

It answers the grading prompts `JudgeReward` sends with the rubric's score of the answer (0-10), so the demo
runs with no LLM provider, over the same HTTP path a real judge would be asked on.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import FastAPI, Request

from nightlab.recipes.online.loop import Rubric


def _question_and_answer(prompt: str) -> tuple[str, str]:
    head, _, answer = prompt.rpartition("\nAnswer: ")
    question = head.rpartition("Question: ")[2]
    return question, answer.rpartition("\nGrade (0-10):")[0]


def rule_judge_app(rubric: Rubric) -> FastAPI:
    app = FastAPI(title="nightlab rule judge")

    @app.post("/v1/chat/completions")
    async def grade(request: Request) -> dict[str, Any]:
        body = await request.json()
        question, answer = _question_and_answer(str(body["messages"][-1]["content"]))
        score = round(10 * rubric(question, answer), 2)
        message = {"role": "assistant", "content": f"{score:g}"}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "rule-judge"),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
        }

    return app
