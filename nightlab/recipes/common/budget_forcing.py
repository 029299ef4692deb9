"""Budget forcing from a client: the `budget_forcing` extension field of nightlab's sample APIs.

The service's sampler controls thinking length (s1): before `min_thinking_tokens` an attempt to close thinking
(`end_thinking`, EOS or a stop) is taken back and `wait_text` written instead; at `max_thinking_tokens` it
forces `end_thinking` + `answer_prefix`. Counting starts at the first generated token, so the prompt should
end inside an opened thinking section (`chat_prompt(..., think=True)`); through `/v1/chat/completions` the
prompt is the chat template's assistant opening, so the model's own `<think>` counts toward the budget.

- `/v1/completions` and `/v1/chat/completions`: pass `extra_body={"budget_forcing": budget_forcing(...)}` to
  the OpenAI SDK.
- Tinker `/api/v1/asample`: the tinker SDK's request model forbids unknown fields (and its `SamplingParams`
  drops them), so `sample_with_budget_forcing` sends the same request over plain HTTP and decodes the reply
  with the SDK's own deserializer, returning a regular `tinker.SampleResponse`.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import tinker
from tinker.proto.response_conv import deserialize_sample_response

from nightlab.recipes.common.chat_format import ANSWER_PREFIX, THINK_CLOSE

RETRY_STATUS = 408  # retrieve_future's "not done yet, ask again"


def budget_forcing(
    max_thinking_tokens: int | None,
    min_thinking_tokens: int = 0,
    *,
    end_thinking: str = THINK_CLOSE,
    wait_text: str = "Wait",
    answer_prefix: str = ANSWER_PREFIX,
) -> dict[str, Any]:
    """The extension field's value; the defaults match the recipes' chat format."""
    return {
        "min_thinking_tokens": min_thinking_tokens,
        "max_thinking_tokens": max_thinking_tokens,
        "end_thinking": end_thinking,
        "wait_text": wait_text,
        "answer_prefix": answer_prefix,
    }


def sample_with_budget_forcing(
    base_url: str,
    api_key: str | None,
    model: str,
    prompt: list[int],
    params: tinker.SamplingParams,
    forcing: dict[str, Any],
    *,
    num_samples: int = 1,
    timeout_s: float = 600.0,
) -> tinker.SampleResponse:
    """`SamplingClient.sample` plus budget forcing. `model` is a base model name or a tinker:// sampler
    path."""
    target = {"model_path": model} if model.startswith("tinker://") else {"base_model": model}
    body = {
        **target,
        "num_samples": num_samples,
        "budget_forcing": forcing,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": list(prompt)}]},
        "sampling_params": params.model_dump(exclude_none=True),
    }
    headers = {"X-API-Key": api_key} if api_key else {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=f"{base_url.rstrip('/')}/api/v1", headers=headers, timeout=60) as http:
        request_id = _checked(http.post("/asample", json=body)).json()["request_id"]
        while (
            done := http.post("/retrieve_future", json={"request_id": request_id})
        ).status_code == RETRY_STATUS:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sample after {timeout_s:.0f} s (request {request_id})")
        if "json" in _checked(done).headers.get("content-type", ""):  # a failed future: {"error": ...}
            raise ValueError(f"sampling failed: {done.json().get('error', done.text)}")
        return deserialize_sample_response(done.content)


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise ValueError(f"{response.request.url.path} answered {response.status_code}: {response.text}")
    return response
