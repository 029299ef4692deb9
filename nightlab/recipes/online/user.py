"""A simulated user for the online loop's demo and tests: asks the served alias over real HTTP, then rates
each answer by a fixed preference (`rubric.user_rating` by default) through `POST /v1/feedback`."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai

from nightlab.recipes.online.rubric import user_rating

Preference = Callable[[str, str], tuple[float, str | None]]


class SimulatedUser:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        prefer: Preference = user_rating,
        max_tokens: int = 24,
    ) -> None:
        root = base_url.rstrip("/") + "/v1"
        self.chat = openai.OpenAI(base_url=root, api_key=api_key or "none", max_retries=2, timeout=120)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=root, headers=headers, timeout=60)
        self.model, self.prefer, self.max_tokens = model, prefer, max_tokens

    def visit(self, questions: list[str]) -> list[float]:
        """Ask each question once and rate the answer; the ratings sent."""
        ratings = []
        for question in questions:
            reply = self.chat.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": question}], max_tokens=self.max_tokens
            )
            answer = reply.choices[0].message.content or ""
            rating, correction = self.prefer(question, answer)
            sent = self.http.post(
                "/feedback", json={"id": reply.id, "rating": rating, "correction": correction}
            )
            sent.raise_for_status()
            ratings.append(rating)
        return ratings

    def close(self) -> None:
        self.http.close()
        self.chat.close()
