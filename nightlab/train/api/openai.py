"""OpenAI-compatible `/v1` endpoint: models, completions and chat completions on the training service's engine.

Any OpenAI client (the official SDK, curl, evaluation harnesses) can sample a base model or a trained checkpoint
(`model="tinker://<run>/sampler_weights/<name>"`) without learning the Tinker API. Requests go through the same
batch queue as Tinker's `/asample` when the app has one, so concurrent callers share one batched generation.

Deviations from OpenAI, all deliberate: `stop` also ends on the model's EOS; penalties, `logit_bias`, `echo`,
`suffix` and `best_of` are refused (400) rather than silently ignored; extensions: `top_k`, `ignore_eos` (as in
vLLM), and `budget_forcing` (s1-style thinking control: {min_thinking_tokens, max_thinking_tokens, end_thinking,
wait_text, answer_prefix}).
Streaming sends text as tokens are generated; with `logprobs` the entries arrive in each choice's final chunk,
and with `budget_forcing` the text arrives at the end (thinking can still be taken back until then).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nightlab.train.engine import Engine, EngineError
from nightlab.train.futures import BatchQueue, UserError
from nightlab.train.sampling import (
    BudgetForcing,
    SampledSequence,
    SampleRequest,
    SampleResult,
    SamplingParams,
)
from nightlab.train.sessions import LOCAL_OWNER

logger = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.005  # how long the first request waits for company when the app has no shared queue
MAX_BATCH = 64
DEFAULT_CHAT_MAX_TOKENS = 1024  # OpenAI's "until the context ends" is hours on a CPU; cap the default
MAX_TOP_LOGPROBS = 20


class OpenAIError(Exception):
    """An error answered in OpenAI's shape, {"error": {message, type, param, code}}, so SDKs raise the right class."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# --- request bodies -------------------------------------------------------------------------------------------


class BudgetForcingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_thinking_tokens: int = Field(0, ge=0)
    max_thinking_tokens: int | None = Field(None, ge=1)
    end_thinking: str = Field("</think>", min_length=1)
    wait_text: str = Field("Wait", min_length=1)
    answer_prefix: str = ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored (clients send many); harmful ones are refused."""

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
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise OpenAIError(400, "stop sequences must be non-empty strings", param="stop")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... pass through to the chat template
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    """Parse a body ourselves so bad input is a 400 in OpenAI's shape naming the field, not FastAPI's 422."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(400, f"invalid request: {param}: {first['msg']}", param=param) from None


# --- the router -----------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """What a `model` string names: a base model, optionally with a checkpoint's adapter on it."""

    name: str
    base: str
    adapter_dir: Path | None
    context: int
    tokenizer: Any


@dataclass
class _Prompt:
    tokens: list[int]
    first_choice: int  # index of this prompt's first choice in the response


@dataclass
class _Job:
    """One HTTP request's worth of generation: its prompts and the sampling requests built for them."""

    target: _Target
    prompts: list[_Prompt]
    requests: list[SampleRequest]
    stops: list[str]
    n: int
    top_logprobs: int | None  # None: no logprobs
    events: asyncio.Queue[tuple[int, int]] = field(
        default_factory=asyncio.Queue
    )  # (choice, token) as generated


def build_router(engine: Engine) -> APIRouter:
    """The `/v1` routes. Checkpoints, API keys and the batch queue come from the app's Tinker service when present."""
    router = APIRouter()
    own_queue: BatchQueue[tuple[str, Path | None], SampleRequest, SampleResult] = BatchQueue(
        lambda key, reqs: engine.sample(*key, reqs), window_s=BATCH_WINDOW_S, max_batch=MAX_BATCH
    )

    def service(request: Request) -> Any:
        return getattr(request.app.state, "tinker", None)

    def owner(request: Request) -> str:
        svc = service(request)
        if svc is None:
            return LOCAL_OWNER
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        try:
            return svc.sessions.authenticate(key)
        except UserError as exc:
            raise OpenAIError(exc.status, str(exc), code="invalid_api_key") from None

    async def target(request: Request, name: str) -> _Target:
        """Authenticate, then resolve `model` to weights; unknown names are 404 `model_not_found`."""
        who = owner(request)
        base, adapter_dir = name, None
        if name.startswith("tinker://"):
            svc = service(request)
            if svc is None:
                raise OpenAIError(
                    404, "this server has no checkpoints to sample", param="model", code="model_not_found"
                )
            try:
                run, ckpt = svc.checkpoints.resolve(name, who)
            except UserError as exc:
                code = "model_not_found" if exc.status in (403, 404) else None
                raise OpenAIError(404 if code else exc.status, str(exc), param="model", code=code) from None
            base, adapter_dir = run.base_model, ckpt.directory
        try:
            info = await asyncio.to_thread(engine.model_info, base)
            tokenizer = await asyncio.to_thread(engine.tokenizer, base)
        except EngineError as exc:
            if exc.category != "User":
                raise
            raise OpenAIError(
                404,
                f"model {name!r} not found: {exc}; GET /v1/models lists what this server serves",
                param="model",
                code="model_not_found",
            ) from None
        return _Target(name, base, adapter_dir, info.max_context_length, tokenizer)

    async def run(request: Request, job: _Job) -> list[SampleResult]:
        svc = service(request)
        queue = svc.sampling if svc is not None else own_queue
        key = (job.target.base, job.target.adapter_dir)
        try:
            return list(await asyncio.gather(*(queue.submit(key, r) for r in job.requests)))
        except UserError as exc:
            raise OpenAIError(exc.status, str(exc)) from None
        except EngineError as exc:
            raise OpenAIError(400 if exc.category == "User" else 500, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the client still gets an OpenAI-shaped answer
            logger.exception("generation failed")
            raise OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}") from None

    @router.get("/models")
    async def list_models(request: Request) -> JSONResponse:
        try:
            who = owner(request)
        except OpenAIError as exc:
            return exc.response()
        data = [_model_card(m.name) for m in await asyncio.to_thread(engine.models)]
        svc = service(request)
        if svc is not None:
            ckpts, _ = await asyncio.to_thread(svc.checkpoints.user_checkpoints, who)
            data += [_model_card(c.tinker_path, c.created_at) for c in ckpts if c.kind == "sampler"]
        return JSONResponse({"object": "list", "data": data})

    @router.post("/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            body: CompletionBody = _parse(CompletionBody, await request.body())
            body.refuse_unsupported()
            for name in ("echo", "suffix"):
                if getattr(body, name):
                    raise OpenAIError(400, f"{name} is not supported by this server", param=name)
            if body.best_of not in (None, 1, body.n or 1):
                raise OpenAIError(400, "best_of must equal n on this server", param="best_of")
            tgt = await target(request, body.model)
            prompts = _completion_prompts(body.prompt, tgt.tokenizer)
            job = _job(
                tgt, body, prompts, body.max_tokens if body.max_tokens is not None else 16, body.logprobs
            )
            return await _respond(job, body, lambda: run(request, job), "text_completion")
        except OpenAIError as exc:
            return exc.response()

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            body: ChatBody = _parse(ChatBody, await request.body())
            body.refuse_unsupported()
            if body.top_logprobs and not body.logprobs:
                raise OpenAIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            tgt = await target(request, body.model)
            tokens = _chat_prompt(body.messages, tgt.tokenizer)
            limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            if limit is None:
                limit = max(0, min(DEFAULT_CHAT_MAX_TOKENS, tgt.context - len(tokens)))
            top = (body.top_logprobs or 0) if body.logprobs else None
            job = _job(tgt, body, [tokens], limit, top)
            return await _respond(job, body, lambda: run(request, job), "chat.completion")
        except OpenAIError as exc:
            return exc.response()

    return router


def _model_card(name: str, created: float | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created or 0), "owned_by": "nightlab"}


# --- prompts ----------------------------------------------------------------------------------------------------


def _completion_prompts(prompt: Any, tokenizer) -> list[list[int]]:
    """OpenAI's four prompt forms: a string, strings, a token list, token lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if not prompt:
        raise OpenAIError(400, "prompt is empty", param="prompt")
    out = []
    for p in prompt:
        tokens = tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
        if not tokens:
            raise OpenAIError(
                400, "a prompt encodes to no tokens; send at least one character", param="prompt"
            )
        if any(not 0 <= t < len(tokenizer) for t in tokens):
            raise OpenAIError(400, f"prompt token ids must be in [0, {len(tokenizer)})", param="prompt")
        out.append(tokens)
    return out


def _chat_prompt(messages: list[ChatMessage], tokenizer) -> list[int]:
    """Render messages with the model's own chat template, ready for the assistant's turn."""
    rendered = []
    for m in messages:
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):  # content parts: only text can reach a text model
            if any(part.get("type") != "text" for part in m.content):
                raise OpenAIError(400, "only text content parts are supported", param="messages")
            msg["content"] = "".join(part.get("text", "") for part in m.content)
        msg.setdefault("content", "")
        rendered.append(msg)
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - template errors come as many types; all mean "bad messages"
        raise OpenAIError(
            400, f"the chat template rejected these messages: {exc}", param="messages"
        ) from None
    return tokenizer.encode(text, add_special_tokens=False)


def _job(tgt: _Target, body: _Body, prompts: list[list[int]], max_tokens: int, top: int | None) -> _Job:
    n = body.n or 1
    longest = max(len(p) for p in prompts)
    if tgt.context and longest + max_tokens > tgt.context:
        raise OpenAIError(
            400,
            f"this model's context is {tgt.context} tokens; the prompt has {longest} and max_tokens asks for "
            f"{max_tokens} more: shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=-1 if body.top_k is None else body.top_k,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop_strings=body.stops,
        stop_at_eos=not body.ignore_eos,
    )
    bf = BudgetForcing(**body.budget_forcing.model_dump()) if body.budget_forcing else None
    job = _Job(tgt, [_Prompt(p, i * n) for i, p in enumerate(prompts)], [], body.stops, n, top)
    for prompt in job.prompts:
        notify = _notifier(job.events, prompt.first_choice) if body.stream and bf is None else None
        job.requests.append(
            SampleRequest(
                prompt.tokens, params, n, topk_sample_logprobs=top or 0, budget_forcing=bf, on_token=notify
            )
        )
    return job


def _notifier(events: asyncio.Queue[tuple[int, int]], first_choice: int) -> Callable[[int, int], None]:
    """A token callback for the generating thread that hands (choice, token) to the event loop."""
    loop = asyncio.get_running_loop()

    def notify(sample: int, token: int) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (first_choice + sample, token))

    return notify


# --- responses ----------------------------------------------------------------------------------------------------


@dataclass
class _Choice:
    """A finished sequence as the client sees it: the stop sequence removed from text and logprobs."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None
    finish_reason: Literal["stop", "length"]


def _choice(seq: SampledSequence, tokenizer, stops: list[str]) -> _Choice:
    tokens = list(seq.tokens)
    if seq.stop_reason == "stop" and tokens and not _any_in(_decode(tokenizer, tokens), stops):
        tokens = tokens[:-1]  # a stop token (EOS): not part of the answer
    text = _decode(tokenizer, tokens)
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    kept = len(tokens)
    if cut < len(text):  # keep the tokens whose text starts before the stop string
        kept = next(i for i in range(len(tokens) + 1) if len(_decode(tokenizer, tokens[:i])) >= cut)
    top = seq.topk_logprobs[:kept] if seq.topk_logprobs is not None else None
    return _Choice(text[:cut], tokens[:kept], seq.logprobs[:kept], top, seq.stop_reason)


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _any_in(text: str, stops: list[str]) -> bool:
    return any(s in text for s in stops)


def _usage(job: _Job, results: list[SampleResult]) -> dict[str, int]:
    prompt = sum(len(p.tokens) for p in job.prompts)
    completion = sum(len(s.tokens) for r in results for s in r.sequences)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(choice: _Choice, tokenizer) -> dict[str, Any]:
    """Legacy completions format: parallel lists of token strings, logprobs, top alternatives, text offsets."""
    strings = [tokenizer.decode([t]) for t in choice.tokens]
    offsets = [len(_decode(tokenizer, choice.tokens[:i])) for i in range(len(choice.tokens))]
    top = (
        [{tokenizer.decode([t]): lp for t, lp in alts} for alts in choice.top]
        if choice.top is not None
        else None
    )
    return {"tokens": strings, "token_logprobs": choice.logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(choice: _Choice, tokenizer) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for i, (token, logprob) in enumerate(zip(choice.tokens, choice.logprobs, strict=True)):
        alts = [entry(t, lp) for t, lp in choice.top[i]] if choice.top else []
        content.append({**entry(token, logprob), "top_logprobs": alts})
    return {"content": content}


def _logprobs(kind: str, choice: _Choice, job: _Job) -> dict[str, Any] | None:
    if job.top_logprobs is None:
        return None
    render = _chat_logprobs if kind == "chat.completion" else _completion_logprobs
    return render(choice, job.target.tokenizer)


async def _respond(
    job: _Job, body: _Body, generate: Callable[[], Any], kind: str
) -> JSONResponse | StreamingResponse:
    ident = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    head = {"id": ident, "created": created, "model": job.target.name}
    if not body.stream:
        results = await generate()
        choices = []
        for r, prompt in zip(results, job.prompts, strict=True):
            for j, seq in enumerate(r.sequences):
                c = _choice(seq, job.target.tokenizer, job.stops)
                item: dict[str, Any] = {"index": prompt.first_choice + j, "finish_reason": c.finish_reason}
                item["logprobs"] = _logprobs(kind, c, job)
                if kind == "chat.completion":
                    item["message"] = {"role": "assistant", "content": c.text}
                else:
                    item["text"] = c.text
                choices.append(item)
        return JSONResponse({**head, "object": kind, "choices": choices, "usage": _usage(job, results)})
    task = asyncio.create_task(generate())
    first = await _first_event(job, task)  # errors before the first token still get a proper HTTP status
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _stream(job, task, first, head, kind, include_usage), media_type="text/event-stream"
    )


async def _first_event(job: _Job, task: asyncio.Task) -> tuple[int, int] | None:
    getter = asyncio.ensure_future(job.events.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    task.result()  # raises the OpenAIError, if any
    return None


class _TextStream:
    """Turns a growing token list into text deltas that never need taking back.

    Holds back a trailing partial UTF-8 character and any tail that could still become a stop string.
    """

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = _decode(self.tokenizer, self.tokens).rstrip("\ufffd")
        found = min((i for s in self.stops if (i := text.find(s)) >= 0), default=len(text))
        safe = found
        for s in self.stops:  # a tail that could still grow into a stop string waits
            k = next((k for k in range(min(len(s) - 1, found), 0, -1) if text[:found].endswith(s[:k])), 0)
            safe = min(safe, found - k)
        return self._take(text, safe)

    def finish(self, text: str) -> str:
        return self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        delta = text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta


async def _stream(
    job: _Job, task: asyncio.Task, first: tuple[int, int] | None, head: dict, kind: str, include_usage: bool
) -> AsyncIterator[str]:
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    count = len(job.prompts) * job.n
    streams = [_TextStream(job.target.tokenizer, job.stops) for _ in range(count)]

    def chunk(index: int, text: str | None, finish: str | None = None, logprobs: Any = None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            item = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            item = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return _sse({**head, "object": obj, "choices": [item]})

    if chat:
        for i in range(count):
            yield _sse(
                {
                    **head,
                    "object": obj,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
    pending = [first] if first is not None else []
    while True:
        for index, token in pending:
            if delta := streams[index].push(token):
                yield chunk(index, delta)
        pending = []
        if job.events.empty():
            if task.done():  # every token event is queued before the generation's result arrives
                break
            getter = asyncio.ensure_future(job.events.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                pending.append(getter.result())
            else:
                getter.cancel()
        while not job.events.empty():
            pending.append(job.events.get_nowait())
    try:
        results = task.result()
    except OpenAIError as exc:
        yield _sse(
            {"error": {"message": str(exc), "type": "server_error", "param": exc.param, "code": exc.code}}
        )
        return
    for r, prompt in zip(results, job.prompts, strict=True):
        for j, seq in enumerate(r.sequences):
            index = prompt.first_choice + j
            c = _choice(seq, job.target.tokenizer, job.stops)
            if delta := streams[index].finish(c.text):
                yield chunk(index, delta)
            yield chunk(index, None if chat else "", c.finish_reason, _logprobs(kind, c, job))
    if include_usage:
        yield _sse({**head, "object": obj, "choices": [], "usage": _usage(job, results)})
    yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
