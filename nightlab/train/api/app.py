"""The training service's FastAPI app: the Tinker protocol under /api/v1 and OpenAI's under /v1."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from nightlab.train.api.guards import RequestGuards
from nightlab.train.api.openai import build_router as build_openai_router
from nightlab.train.api.openai import openai_error_response
from nightlab.train.api.service import TinkerService
from nightlab.train.api.tinker import build_router, error_response, validation_message
from nightlab.train.engine import Engine
from nightlab.train.errors import EngineError, OpenAIError, UserError
from nightlab.train.settings import ServeSettings

logger = logging.getLogger(__name__)

# Idle connections stay open longer than clients keep them: httpx (under the tinker SDK) drops them after
# 5 s, uvicorn's default, and with equal timeouts a client can pick a connection the server is closing.
KEEP_ALIVE_S = 75


def create_app(settings: ServeSettings, engine: Engine | None = None) -> FastAPI:
    """Build the app; pass `engine` to share loaded base models (a restart in tests, the CLI's preload)."""
    engine = engine or Engine(
        settings.data_dir,
        device=settings.device,
        preload=settings.preload,
        quantization=settings.quantization,
        memory_limit=settings.memory_limit,
    )
    service = TinkerService(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        await service.close()

    app = FastAPI(title="nightlab training service", lifespan=lifespan)
    app.state.engine = engine
    app.state.tinker = service  # the OpenAI routes find checkpoints and API keys here
    app.include_router(build_router(service), prefix="/api/v1")
    app.include_router(build_openai_router(engine), prefix="/v1")
    keys = frozenset(settings.api_keys)
    app.add_middleware(RequestGuards, settings=settings, known_key=keys.__contains__)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return openai_error_response(exc)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        return JSONResponse(
            {"error": validation_message(errors), "category": "user", "detail": jsonable(errors)},
            status_code=422,
        )

    return app


def jsonable(errors: list[dict]) -> list[dict]:
    """Validation errors can carry exceptions in `ctx`; keep only what JSON can carry."""
    return [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]


NO_MODELS_HINT = (
    "No model to serve yet: clients would get only errors. Prepare the offline default with "
    "`nightlab models prepare smollm2 --data-dir {data_dir}` (or `nightlab models pull NAME`), or start with "
    "--allow-model PATH / --preload PATH."
)


def serve(settings: ServeSettings) -> None:
    """Start the service: list the servable models, load the preloads with progress, then serve until Ctrl-C.

    uvicorn turns Ctrl-C into a graceful shutdown: the app stops taking requests, queued training work gets
    `shutdown_grace_s` to finish, and checkpoints are written atomically (an interrupted save leaves nothing).
    """
    import uvicorn
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    settings.check_exposure()
    console = Console(stderr=True)
    engine = Engine(
        settings.data_dir,
        device=settings.device,
        quantization=settings.quantization,
        memory_limit=settings.memory_limit,
    )
    engine.serve_only([*settings.preload, *settings.allowed_models], settings.max_loaded_bases)
    for name in settings.preload:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        ) as bar:
            bar.add_task(f"loading {name}", total=None)
            info = engine.model_info(name)
        console.print(f"loaded {info.name} ({info.arch}, context {info.max_context_length})")
    table = Table(title="models this server can train and sample")
    for col in ("model", "architecture", "context"):
        table.add_column(col)
    servable = engine.models()
    for m in servable:
        table.add_row(m.name, m.arch, str(m.max_context_length))
    console.print(table)
    if not servable:
        console.print(f"[yellow]{NO_MODELS_HINT.format(data_dir=settings.data_dir)}[/]")
    auth = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "no API keys (local use only)"
    console.print(
        f"Tinker API: http://{settings.host}:{settings.port}/api/v1 (TINKER_BASE_URL=http://{settings.host}:"
        f"{settings.port}), OpenAI API: /v1, data in {settings.data_dir}, {auth}"
    )
    config = uvicorn.Config(
        create_app(settings, engine),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE_S,
        log_level="info",
    )
    with suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C once its graceful shutdown is done
        uvicorn.Server(config).run()
    console.print(f"stopped; everything saved is in {settings.data_dir}")
