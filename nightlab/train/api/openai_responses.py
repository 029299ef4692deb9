"""From finished (or growing) generations to OpenAI's answers: JSON, or server-sent events as tokens arrive.

Stop sequences are cut from text and logprobs, as OpenAI does. Streaming sends only text that can never need
taking back: a trailing partial UTF-8 character and any tail that could still become a stop string wait.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse, StreamingResponse

from nightlab.train.api.openai_bodies import SamplingBody
from nightlab.train.api.openai_prompts import Job
from nightlab.train.errors import OpenAIError
from nightlab.train.sampling import SampledSequence, SampleResult


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


def _usage(job: Job, results: list[SampleResult]) -> dict[str, int]:
    prompt = sum(len(p.tokens) for p in job.prompts)
    completion = sum(len(s.tokens) for r in results for s in r.sequences)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(choice: _Choice, tokenizer) -> dict[str, Any]:
    """Legacy completions format: parallel lists of token strings, logprobs, top alternatives, offsets."""
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


def _logprobs(kind: str, choice: _Choice, job: Job) -> dict[str, Any] | None:
    if job.top_logprobs is None:
        return None
    render = _chat_logprobs if kind == "chat.completion" else _completion_logprobs
    return render(choice, job.target.tokenizer)


# Told a response's id and its answers, (choice index, prompt index, text) each, once they are complete.
Remember = Callable[[str, list[tuple[int, int, str]]], Awaitable[None]]


async def respond(
    job: Job,
    body: SamplingBody,
    generate: Callable[[], Awaitable[list[SampleResult]]],
    kind: str,
    remember: Remember | None = None,
) -> JSONResponse | StreamingResponse:
    """The answer to `job` as one JSON body, or as an event stream; `kind` is the object OpenAI names.
    `remember` keeps the answers (for feedback) before the body is sent, or once a stream has them all."""
    ident = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    head = {"id": ident, "created": created, "model": job.target.name}
    if not body.stream:
        results = await generate()
        choices, answers = [], []
        for p, (r, prompt) in enumerate(zip(results, job.prompts, strict=True)):
            for j, seq in enumerate(r.sequences):
                c = _choice(seq, job.target.tokenizer, job.stops)
                answers.append((prompt.first_choice + j, p, c.text))
                item: dict[str, Any] = {"index": prompt.first_choice + j, "finish_reason": c.finish_reason}
                item["logprobs"] = _logprobs(kind, c, job)
                if kind == "chat.completion":
                    item["message"] = {"role": "assistant", "content": c.text}
                else:
                    item["text"] = c.text
                choices.append(item)
        if remember is not None:
            await remember(ident, answers)
        return JSONResponse({**head, "object": kind, "choices": choices, "usage": _usage(job, results)})
    task = asyncio.create_task(generate())
    first = await _first_event(job, task)  # errors before the first token still get a proper HTTP status
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _stream(job, task, first, head, kind, include_usage, remember), media_type="text/event-stream"
    )


async def _first_event(job: Job, task: asyncio.Task) -> tuple[int, int] | None:
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
    job: Job,
    task: asyncio.Task,
    first: tuple[int, int] | None,
    head: dict,
    kind: str,
    include_usage: bool,
    remember: Remember | None,
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

    if chat:  # each choice opens with the assistant's role
        for i in range(count):
            opening = {"index": i, "delta": {"role": "assistant", "content": ""}}
            yield _sse(
                {**head, "object": obj, "choices": [{**opening, "logprobs": None, "finish_reason": None}]}
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
        yield _sse(exc.body("server_error"))
        return
    answers = []
    for p, (r, prompt) in enumerate(zip(results, job.prompts, strict=True)):
        for j, seq in enumerate(r.sequences):
            index = prompt.first_choice + j
            c = _choice(seq, job.target.tokenizer, job.stops)
            answers.append((index, p, c.text))
            if delta := streams[index].finish(c.text):
                yield chunk(index, delta)
            yield chunk(index, None if chat else "", c.finish_reason, _logprobs(kind, c, job))
    if remember is not None:
        await remember(head["id"], answers)
    if include_usage:
        yield _sse({**head, "object": obj, "choices": [], "usage": _usage(job, results)})
    yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
