"""OpenAI-compatible `/v1` routes: models, completions and chat completions on the training service's engine.

Any OpenAI client (the official SDK, curl, evaluation harnesses) can sample a base model or a trained
checkpoint (`model="tinker://<run>/sampler_weights/<name>"`) without learning the Tinker API. Requests go
through the same batch queue as Tinker's `/asample` when the app has one, so concurrent callers share one
batched generation. Bodies are in `openai_bodies`, prompts and limits in `openai_prompts`, answers (JSON and
streams) in `openai_responses`.

Deviations from OpenAI, all deliberate: `stop` also ends on the model's EOS; penalties, `logit_bias`, `echo`,
`suffix` and `best_of` are refused (400) rather than silently ignored; extensions: `top_k`, `ignore_eos` (as
in vLLM), and `budget_forcing` (s1-style thinking control: {min_thinking_tokens, max_thinking_tokens,
end_thinking, wait_text, answer_prefix}).
Streaming sends text as tokens are generated; with `logprobs` the entries arrive in each choice's final
chunk, and with `budget_forcing` the text arrives at the end (thinking can still be taken back until then).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from nightlab.train.aliases import AliasMove, check_name
from nightlab.train.api.openai_bodies import (
    MAX_BATCH,
    AliasBody,
    ChatBody,
    CompletionBody,
    RollbackBody,
    parse_body,
)
from nightlab.train.api.openai_prompts import (
    Job,
    Target,
    chat_job,
    chat_prompt,
    completion_job,
    completion_prompts,
)
from nightlab.train.api.openai_responses import Remember, respond
from nightlab.train.engine import Engine
from nightlab.train.errors import EngineError, OpenAIError, UserError
from nightlab.train.feedback import FeedbackBody
from nightlab.train.futures import BatchQueue
from nightlab.train.sampling import SampleRequest, SampleResult
from nightlab.train.sessions import LOCAL_OWNER

logger = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.005  # how long the first request waits for company when the app has no shared queue


def build_router(engine: Engine) -> APIRouter:
    """The `/v1` routes; checkpoints, API keys and the batch queue come from the app's Tinker service."""
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

    async def target(request: Request, name: str) -> Target:
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
        return Target(name, base, adapter_dir, info.max_context_length, tokenizer, info.image_token_id)

    def resolve_alias(request: Request, name: str) -> str:
        """The model an alias of this key points at now; any other name as it is."""
        svc = service(request)
        if svc is None or name.startswith("tinker://"):
            return name
        move = svc.aliases.current(owner(request), name)
        return move.model if move is not None else name

    async def run(request: Request, job: Job) -> list[SampleResult]:
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

    def remembering(request: Request, model: str, prompts: list[Any]) -> Remember | None:
        """What keeps a response's answers with their prompts, so feedback can be sent on them later."""
        svc = service(request)
        if svc is None:
            return None
        who = owner(request)

        async def remember(answer_id: str, answers: list[tuple[int, int, str]]) -> None:
            rows = [(index, prompts[p], text) for index, p, text in answers]
            await asyncio.to_thread(svc.feedback.remember, answer_id, who, model, rows)

        return remember

    @router.post("/feedback")
    async def feedback(request: Request) -> JSONResponse:
        """A rating (and optionally a correction and a comment) of an answer this key was given."""
        who = owner(request)
        svc = service(request)
        if svc is None:
            raise OpenAIError(404, "this server keeps no feedback")
        body = parse_body(FeedbackBody, await request.body())
        try:
            replaced = await asyncio.to_thread(svc.feedback.record, who, body)
        except UserError as exc:
            raise OpenAIError(exc.status, str(exc), param="id") from None
        status = "replaced" if replaced else "recorded"
        answer = {"id": body.id, "choice": body.choice, "object": "feedback", "status": status}
        return JSONResponse(answer)

    def alias_service(request: Request) -> tuple[Any, str]:
        svc = service(request)
        if svc is None:
            raise OpenAIError(404, "this server keeps no aliases")
        return svc, owner(request)

    def alias_card(move: AliasMove, history: list[AliasMove] | None = None) -> dict[str, Any]:
        card: dict[str, Any] = {"object": "alias", "name": move.name, "model": move.model}
        card |= {"kind": move.kind, "reason": move.reason, "moved_at": move.moved_at}
        if history is not None:
            card["history"] = [alias_card(m) for m in history]
        return card

    @router.get("/feedback")
    async def list_feedback(request: Request, since: str = "0") -> JSONResponse:
        """This key's rated answers (rated or re-rated after `since`, Unix time), oldest first: what an
        online loop on the public API reads to update its reward model."""
        try:
            after = float(since)
        except ValueError:
            why = f"since must be a Unix time, not {since[:40]!r}"
            raise OpenAIError(400, why, param="since") from None
        svc = service(request)
        if svc is None:
            raise OpenAIError(404, "this server keeps no feedback")
        who = owner(request)
        rows = await asyncio.to_thread(lambda: list(svc.feedback.rows(who, after)))
        return JSONResponse({"object": "list", "data": rows})

    @router.put("/aliases/{name}")
    async def set_alias(name: str, request: Request) -> JSONResponse:
        """Point a served alias at a model this key may sample (a base model or a `tinker://` checkpoint)."""
        svc, who = alias_service(request)
        body = parse_body(AliasBody, await request.body())
        try:
            check_name(name)
        except UserError as exc:
            raise OpenAIError(400, str(exc), param="name") from None
        if name in {m.name for m in await asyncio.to_thread(engine.models)}:
            raise OpenAIError(400, f"{name!r} is a served model's own name; pick another", param="name")
        await target(request, body.model)  # servable to this key, or a 404 naming why
        move = await asyncio.to_thread(svc.aliases.move, who, name, body.model, body.reason)
        return JSONResponse(alias_card(move))

    @router.get("/aliases")
    async def list_aliases(request: Request) -> JSONResponse:
        svc, who = alias_service(request)
        moves = await asyncio.to_thread(svc.aliases.names, who)
        return JSONResponse({"object": "list", "data": [alias_card(m) for m in moves]})

    @router.get("/aliases/{name}")
    async def get_alias(name: str, request: Request) -> JSONResponse:
        svc, who = alias_service(request)
        history = await asyncio.to_thread(svc.aliases.history, who, name)
        if not history:
            raise OpenAIError(404, f"no alias {name!r}", param="name")
        return JSONResponse(alias_card(history[0], history))

    @router.post("/aliases/{name}/rollback")
    async def rollback_alias(name: str, request: Request) -> JSONResponse:
        """Undo the alias's latest promotion: back to its previous target."""
        svc, who = alias_service(request)
        raw = await request.body()
        reason = parse_body(RollbackBody, raw).reason if raw.strip() else ""
        try:
            move = await asyncio.to_thread(svc.aliases.rollback, who, name, reason)
        except UserError as exc:
            raise OpenAIError(exc.status, str(exc), param="name") from None
        return JSONResponse(alias_card(move))

    @router.get("/models")
    async def list_models(request: Request) -> JSONResponse:
        who = owner(request)
        data = [_model_card(m.name) for m in await asyncio.to_thread(engine.models)]
        svc = service(request)
        if svc is not None:
            ckpts, _ = await asyncio.to_thread(svc.checkpoints.user_checkpoints, who)
            data += [_model_card(c.tinker_path, c.created_at) for c in ckpts if c.kind == "sampler"]
            data += [_model_card(a.name, a.moved_at) for a in await asyncio.to_thread(svc.aliases.names, who)]
        return JSONResponse({"object": "list", "data": data})

    @router.post("/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = parse_body(CompletionBody, await request.body())
        body.refuse_unsupported()
        to = await target(request, resolve_alias(request, body.model))
        # Tokenizing a long prompt takes seconds: off the event loop, which must keep answering others.
        prompts = await asyncio.to_thread(completion_prompts, body.prompt, to.tokenizer, to.context)
        job = completion_job(to, body, prompts)
        texts = body.prompt if isinstance(body.prompt, list) and len(prompts) > 1 else [body.prompt]
        keep = remembering(request, to.name, texts)
        return await respond(job, body, lambda: run(request, job), "text_completion", keep)

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        body = parse_body(ChatBody, await request.body())
        body.refuse_unsupported()
        to = await target(request, resolve_alias(request, body.model))
        tokens, images = await asyncio.to_thread(
            chat_prompt, body.messages, to.tokenizer, to.context, to.image_token_id
        )
        job = chat_job(to, body, tokens, images)
        keep = remembering(request, to.name, [[m.model_dump(exclude_none=True) for m in body.messages]])
        return await respond(job, body, lambda: run(request, job), "chat.completion", keep)

    return router


def _model_card(name: str, created: float | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created or 0), "owned_by": "nightlab"}


def openai_error_response(exc: OpenAIError) -> JSONResponse:
    """How every OpenAIError a `/v1` route raises is answered (the app registers it as the handler)."""
    return JSONResponse(exc.body(), status_code=exc.status)
