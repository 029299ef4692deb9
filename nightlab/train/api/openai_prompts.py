"""From an OpenAI request to sampling work: prompts (chats via the model's own template), limits, requests.

A `Job` is one HTTP request's worth of generation; when it streams, the generating thread hands each new token
to the event loop through the job's `events` queue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightlab.train.api.openai_bodies import ChatBody, ChatMessage, CompletionBody, SamplingBody
from nightlab.train.errors import OpenAIError
from nightlab.train.records import ImageInput
from nightlab.train.sampling import BudgetForcing, SampleRequest, SamplingParams

DEFAULT_CHAT_MAX_TOKENS = 1024  # OpenAI's "until the context ends" is hours on a CPU; cap the default
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# No token of a real tokenizer spans more characters than this: a prompt longer than the context times it
# cannot fit, and is refused before the tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class Target:
    """What a `model` string names: a base model, optionally with a checkpoint's adapter on it."""

    name: str
    base: str
    adapter_dir: Path | None
    context: int
    tokenizer: Any
    image_token_id: int | None = None  # where the chat template puts an image; None: the model takes none


@dataclass
class Prompt:
    tokens: list[int]
    first_choice: int  # index of this prompt's first choice in the response


@dataclass
class Job:
    """One HTTP request's worth of generation: its prompts and the sampling requests built for them."""

    target: Target
    prompts: list[Prompt]
    requests: list[SampleRequest]
    stops: list[str]
    n: int
    top_logprobs: int | None  # None: no logprobs
    events: asyncio.Queue[tuple[int, int]] = field(default_factory=asyncio.Queue)  # (choice, token)


def completion_job(target: Target, body: CompletionBody, prompts: list[list[int]]) -> Job:
    """The job for `body`'s tokenized `prompts` (from `completion_prompts`, which may take seconds: run it
    off the event loop; the job itself belongs to the loop)."""
    max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    return _job(target, body, prompts, max_tokens, body.logprobs)


def chat_job(target: Target, body: ChatBody, tokens: list[int], images: list[ImageInput]) -> Job:
    """The job for `body`'s rendered prompt `tokens` and its `images` (from `chat_prompt`, off the event
    loop)."""
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if limit is None:
        limit = max(0, min(DEFAULT_CHAT_MAX_TOKENS, target.context - len(tokens)))
    top = (body.top_logprobs or 0) if body.logprobs else None
    return _job(target, body, [tokens], limit, top, images)


def check_fits(length: int, context: int, unit: str, limit: int, param: str) -> None:
    """Refuse a prompt whose `length` in `unit`s is over `limit`: it cannot fit the model's `context`."""
    if context and length > limit:
        raise OpenAIError(
            400,
            f"this model's context is {context} tokens and the prompt has {length} {unit} (at most {limit} "
            "can fit): shorten it",
            param=param,
            code="context_length_exceeded",
        )


def completion_prompts(prompt: Any, tokenizer, context: int = 0) -> list[list[int]]:
    """OpenAI's four prompt forms: a string, strings, a token list, token lists; each checked against the
    `context` before it is tokenized."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if not prompt:
        raise OpenAIError(400, "prompt is empty", param="prompt")
    out, vocab = [], len(tokenizer)  # len() of a Hugging Face tokenizer rebuilds its vocabulary: once
    for p in prompt:
        if isinstance(p, str):
            check_fits(len(p), context, "characters", context * MAX_CHARS_PER_TOKEN, "prompt")
        else:
            check_fits(len(p), context, "tokens", context, "prompt")
        tokens = tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
        if not tokens:
            raise OpenAIError(
                400, "a prompt encodes to no tokens; send at least one character", param="prompt"
            )
        if any(not 0 <= t < vocab for t in tokens):
            raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        out.append(tokens)
    return out


def _data_url_image(part: dict[str, Any]) -> tuple[bytes, str]:
    """The bytes and format of an `image_url` content part, which must hold a base64 data URL: this server
    fetches nothing from the network."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url.startswith("data:"):
        raise OpenAIError(
            400,
            "image_url must be a data URL (data:image/png;base64,...): this server is offline and fetches "
            "no http(s) images",
            param="messages",
        )
    header, _, payload = url.partition(",")
    mime = header.removeprefix("data:").split(";")[0].lower()
    fmt = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg"}.get(mime)
    if fmt is None or not header.endswith(";base64"):
        raise OpenAIError(
            400, f"image_url data URLs must be base64 png or jpeg, not {header!r}", param="messages"
        )
    try:
        return base64.b64decode(payload, validate=True), fmt
    except binascii.Error:
        raise OpenAIError(400, "image_url: the data URL's payload is not base64", param="messages") from None


def _content(
    parts: list[dict[str, Any]], images: list[tuple[bytes, str]], takes_images: bool
) -> str | list[dict[str, Any]]:
    """Text parts joined for a text model; for a vision model, parts as its chat template takes them, each
    image_url's image (bytes, format) added to `images`."""
    if not takes_images:
        if any(part.get("type") != "text" for part in parts):
            raise OpenAIError(400, "only text content parts are supported by this model", param="messages")
        return "".join(part.get("text", "") for part in parts)
    out: list[dict[str, Any]] = []
    for part in parts:
        if part.get("type") == "image_url":
            images.append(_data_url_image(part))
            out.append({"type": "image"})
        elif part.get("type") == "text":
            out.append({"type": "text", "text": part.get("text", "")})
        else:
            raise OpenAIError(400, "content parts must be text or image_url", param="messages")
    return out


def chat_prompt(
    messages: list[ChatMessage], tokenizer, context: int = 0, image_token_id: int | None = None
) -> tuple[list[int], list[ImageInput]]:
    """Render messages with the model's own chat template, ready for the assistant's turn, and take out the
    images (`image_url` parts, for a model whose template writes `image_token_id` for each); messages too long
    for the `context` are refused before rendering."""
    rendered = []
    pictures: list[tuple[bytes, str]] = []
    for m in messages:
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            msg["content"] = _content(m.content, pictures, image_token_id is not None)
        msg.setdefault("content", "")
        rendered.append(msg)
    chars = sum(len(str(m["content"])) for m in rendered)
    check_fits(chars, context, "characters", context * MAX_CHARS_PER_TOKEN, "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - template errors come as many types; all mean "bad messages"
        raise OpenAIError(
            400, f"the chat template rejected these messages: {exc}", param="messages"
        ) from None
    tokens = tokenizer.encode(text, add_special_tokens=False)
    if not pictures:
        return tokens, []
    places = [i for i, t in enumerate(tokens) if t == image_token_id]
    if len(places) != len(pictures):
        raise OpenAIError(
            400, f"the chat template placed {len(places)} of {len(pictures)} images", param="messages"
        )
    # each image replaces its one placeholder; the engine writes as many as its patches need
    images = [
        ImageInput(data, fmt, at - i)
        for i, ((data, fmt), at) in enumerate(zip(pictures, places, strict=True))
    ]
    return [t for t in tokens if t != image_token_id], images


def _job(
    target: Target,
    body: SamplingBody,
    prompts: list[list[int]],
    max_tokens: int,
    top: int | None,
    images: list[ImageInput] | None = None,
) -> Job:
    n = body.n or 1
    longest = max(len(p) for p in prompts)
    if target.context and longest + max_tokens > target.context:
        raise OpenAIError(
            400,
            f"this model's context is {target.context} tokens; the prompt has {longest} and max_tokens asks "
            f"for {max_tokens} more: shorten the prompt or lower max_tokens",
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
    job = Job(target, [Prompt(p, i * n) for i, p in enumerate(prompts)], [], body.stops, n, top)
    for prompt in job.prompts:
        notify = _notifier(job.events, prompt.first_choice) if body.stream and bf is None else None
        job.requests.append(
            SampleRequest(
                prompt.tokens,
                params,
                n,
                topk_sample_logprobs=top or 0,
                budget_forcing=bf,
                images=images or [],
                on_token=notify,
            )
        )
    return job


def _notifier(events: asyncio.Queue[tuple[int, int]], first_choice: int) -> Callable[[int, int], None]:
    """A token callback for the generating thread that hands (choice, token) to the event loop."""
    loop = asyncio.get_running_loop()

    def notify(sample: int, token: int) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (first_choice + sample, token))

    return notify
