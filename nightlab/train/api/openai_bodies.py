"""Request bodies of the OpenAI-compatible `/v1` endpoints, parsed so a bad field is a 400 that names it.

Unknown fields are ignored (clients send many); fields this server would have to ignore silently (penalties,
`logit_bias`) are refused instead.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nightlab.train.api.bodies import BudgetForcingBody
from nightlab.train.errors import OpenAIError

MAX_BATCH = 64  # most choices one request may ask for (`n`)
MAX_TOP_LOGPROBS = 20
Body = TypeVar("Body", bound=BaseModel)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingBody(BaseModel):
    """The fields both endpoints share, and the refusals they share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int | None = Field(None, ge=1, le=MAX_BATCH)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    budget_forcing: BudgetForcingBody | None = None
    ignore_eos: bool | None = False  # as in vLLM: run to max_tokens unless a stop string matches
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(
                    400, f"{name} is not supported by this server; leave it unset or 0", param=name
                )
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if any(not s for s in self.stops):
            raise OpenAIError(400, "stop sequences must be non-empty strings", param="stop")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name} is not supported by this server", param=name)
        if self.best_of not in (None, 1, self.n or 1):
            raise OpenAIError(400, "best_of must equal n on this server", param="best_of")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... pass through to the chat template
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")


def parse_body(model: type[Body], raw: bytes) -> Body:
    """Parse a body ourselves so bad input is a 400 in OpenAI's shape naming the field, not FastAPI's 422."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(400, f"invalid request: {param}: {first['msg']}", param=param) from None


class AliasBody(BaseModel):
    """`PUT /v1/aliases/{name}`: the model the alias points at from now on, and why."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=2000)
    reason: str = Field("", max_length=500)


class RollbackBody(BaseModel):
    """`POST /v1/aliases/{name}/rollback`: why (optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500)
