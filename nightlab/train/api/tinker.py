"""The Tinker wire protocol over FastAPI, so the official `tinker` SDK and its cookbook run unmodified here.

Routes only: request bodies are in `bodies`, protobuf encodings in `wire`, and the state behind the routes in
`service`. Long operations answer `{request_id}` at once and the client polls `/retrieve_future`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from nightlab.train.api.bodies import (
    CreateModelBody,
    CreateSamplerBody,
    CreateSessionBody,
    FinishBody,
    LoadWeightsBody,
    ModelIdBody,
    OptimStepBody,
    RetrieveBody,
    SampleBody,
    SaveForSamplerBody,
    SaveWeightsBody,
    SessionIdBody,
    WeightsInfoBody,
)
from nightlab.train.api.service import TinkerService
from nightlab.train.api.wire import PROTOBUF, decode_forward_backward
from nightlab.train.errors import EngineError, UserError
from nightlab.train.settings import ServeSettings


def sdk_config(settings: ServeSettings) -> dict[str, Any]:
    """What /client/config tells the SDK: stay on httpx, no JWT exchange, results by polling retrieve_future,
    custom losses client-side; forward_backward chunking and compression as the settings say."""
    return {
        "pjwt_auth_enabled": False,
        "use_pyqwest_transport": False,
        "proto_compress_fwdbwd": settings.proto_compress_fwdbwd,
        "parallel_fwdbwd_chunks": True,
        "fwdbwd_max_chunk_len": settings.fwdbwd_max_chunk_len,
        "fwdbwd_max_chunk_bytes_count": 5_000_000,
        "sample_use_retrieve_futures": False,
        "custom_loss_server_side": False,
        "sample_join_sampling_session": False,
    }


def _future(request_id: str, model_id: str | None = None) -> dict[str, Any]:
    return {"request_id": request_id, "model_id": model_id} if model_id else {"request_id": request_id}


def build_router(service: TinkerService) -> APIRouter:
    """All Tinker endpoints, to be mounted under /api/v1."""
    router = APIRouter()

    def owner(x_api_key: str | None = Header(None)) -> str:
        return service.sessions.authenticate(x_api_key)

    Owner = Depends(owner)  # noqa: N806 - reads as a type in the signatures below

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.post("/client/config")
    async def client_config(who: str = Owner) -> dict[str, Any]:
        return sdk_config(service.settings)

    @router.post("/client/dynamic_config")
    async def client_dynamic_config(who: str = Owner) -> dict[str, Any]:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @router.post("/telemetry")
    async def telemetry(request: Request) -> dict[str, str]:
        return {"status": "accepted"}

    @router.post("/create_session")
    async def create_session(body: CreateSessionBody, who: str = Owner) -> dict[str, Any]:
        session = service.sessions.create(
            who, body.tags, body.user_metadata, body.display_name, body.sdk_version
        )
        return {"type": "create_session", "session_id": session.session_id}

    @router.post("/session_heartbeat")
    async def session_heartbeat(body: SessionIdBody, who: str = Owner) -> dict[str, str]:
        service.sessions.heartbeat(body.session_id, who)
        return {"type": "session_heartbeat"}

    @router.post("/sessions/{session_id}/finish")
    async def finish_session(session_id: str, body: FinishBody, who: str = Owner) -> dict[str, str]:
        service.finish_session(who, session_id, body.reason, body.detail)
        return {"status": "finished"}

    @router.get("/sessions")
    async def list_sessions(limit: int = 20, offset: int = 0, who: str = Owner) -> dict[str, Any]:
        ids, _ = service.sessions.list(who, limit, offset)
        return {"sessions": ids}

    @router.get("/sessions/{session_id}")
    async def get_session(session_id: str, who: str = Owner) -> dict[str, Any]:
        session = service.sessions.get(session_id, who)
        runs, _ = service.checkpoints.runs(who, limit=10_000, session_id=session_id)
        samplers = [s.sampler_id for s in service.samplers.values() if s.session_id == session_id]
        metadata = {k: str(v) for k, v in session.user_metadata.items()} if session.user_metadata else None
        return {
            "training_run_ids": [r.run_id for r in runs],
            "sampler_ids": samplers,
            "user_metadata": metadata,
            "display_name": session.display_name,
        }

    @router.get("/get_server_capabilities")
    async def capabilities(who: str = Owner) -> dict[str, Any]:
        models = await service.call(service.engine.models)
        return {
            "supported_models": [
                {
                    "model_name": m.name,
                    "max_context_length": m.max_context_length,
                    "trainable": True,
                    "sampleable": True,
                }
                for m in models
            ]
        }

    @router.post("/create_model")
    async def create_model(body: CreateModelBody, who: str = Owner) -> dict[str, Any]:
        return _future(service.create_model(who, body))

    @router.post("/get_info")
    async def get_info(body: ModelIdBody, who: str = Owner) -> dict[str, Any]:
        return await service.get_info(who, body.model_id)

    @router.post("/forward_backward")
    async def forward_backward(request: Request, who: str = Owner) -> dict[str, Any]:
        if PROTOBUF not in request.headers.get("content-type", ""):
            raise UserError(
                f"forward_backward takes a protobuf body ({PROTOBUF}), as the tinker SDK sends", 415
            )
        req = decode_forward_backward(
            await request.body(), request.headers.get("content-encoding"), service.settings.max_request_bytes
        )
        return _future(service.forward_backward(who, req), req.model_id)

    @router.post("/optim_step")
    async def optim_step(body: OptimStepBody, who: str = Owner) -> dict[str, Any]:
        return _future(service.optim_step(who, body), body.model_id)

    @router.post("/save_weights")
    async def save_weights(body: SaveWeightsBody, who: str = Owner) -> dict[str, Any]:
        return _future(service.save_weights(who, body, for_sampler=False), body.model_id)

    @router.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(body: SaveForSamplerBody, who: str = Owner) -> dict[str, Any]:
        return _future(service.save_for_sampler(who, body), body.model_id)

    @router.post("/load_weights")
    async def load_weights(body: LoadWeightsBody, who: str = Owner) -> dict[str, Any]:
        return _future(service.load_weights(who, body))

    @router.post("/create_sampling_session")
    async def create_sampling_session(body: CreateSamplerBody, who: str = Owner) -> dict[str, Any]:
        return {
            "type": "create_sampling_session",
            "sampling_session_id": await service.create_sampler(who, body),
        }

    @router.get("/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, who: str = Owner) -> dict[str, Any]:
        s = service.sampler(sampler_id, who)
        return {"sampler_id": s.sampler_id, "base_model": s.base_model, "model_path": s.model_path}

    @router.post("/asample")
    async def asample(body: SampleBody, who: str = Owner) -> dict[str, Any]:
        return await service.asample(who, body)

    @router.post("/retrieve_future")
    async def retrieve_future(body: RetrieveBody, who: str = Owner) -> Response:
        future = service.futures.get(body.request_id, who)
        if not await service.futures.wait(future, service.settings.long_poll_s):
            return JSONResponse(
                {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}, status_code=408
            )
        service.futures.fetched(future)
        if future.error is not None:
            return JSONResponse({"error": future.error[0], "category": wire_category(future.error[1])})
        assert future.payload is not None
        if isinstance(future.payload.body, bytes):
            return Response(future.payload.body, media_type=future.payload.media_type)
        return JSONResponse(future.payload.body)

    @router.post("/weights_info")
    async def weights_info(body: WeightsInfoBody, who: str = Owner) -> dict[str, Any]:
        run, _ = service.checkpoints.resolve(body.tinker_path, who)
        lora = run.lora
        return {
            "base_model": run.base_model,
            "is_lora": True,
            "lora_rank": lora.get("rank"),
            "train_unembed": lora.get("train_unembed"),
            "train_mlp": lora.get("train_mlp"),
            "train_attn": lora.get("train_attn"),
            "optimizer_config": {"type": "adamw"},
        }

    @router.get("/training_runs")
    async def list_training_runs(limit: int = 20, offset: int = 0, who: str = Owner) -> dict[str, Any]:
        runs, total = service.checkpoints.runs(who, limit, offset)
        return {
            "training_runs": [service.training_run_json(r.run_id, who) for r in runs],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    @router.get("/training_runs/{run_id}")
    async def get_training_run(run_id: str, who: str = Owner) -> dict[str, Any]:
        return service.training_run_json(run_id, who)

    @router.get("/training_runs/{run_id}/checkpoints")
    async def list_checkpoints(run_id: str, who: str = Owner) -> dict[str, Any]:
        return {"checkpoints": [c.to_json() for c in service.checkpoints.checkpoints(run_id, who)]}

    @router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(run_id: str, checkpoint_id: str, who: str = Owner) -> dict[str, str]:
        await service.call(service.checkpoints.delete, run_id, checkpoint_id, who)
        return {"status": "deleted"}

    @router.get("/checkpoints")
    async def list_user_checkpoints(limit: int = 100, offset: int = 0, who: str = Owner) -> dict[str, Any]:
        ckpts, total = service.checkpoints.user_checkpoints(who, limit, offset)
        return {
            "checkpoints": [c.to_json() for c in ckpts],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    @router.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def unsupported(path: str, request: Request) -> JSONResponse:
        """Endpoints of the hosted service that nightlab lacks (publish, cancel, ...): a clear 404."""
        message = (
            f"{request.method} /api/v1/{path} is not supported by nightlab serve; "
            "docs/service.md lists what is"
        )
        return JSONResponse({"error": message, "category": "user"}, status_code=404)

    return router


def wire_category(category: str) -> str:
    """The SDK parses categories as its RequestErrorCategory values, lower case ("user", "server")."""
    return category.lower()


def error_response(exc: Exception) -> JSONResponse:
    """A user error (or an engine error the user caused) as a 4xx JSON body that says what to fix."""
    if isinstance(exc, UserError):
        return JSONResponse({"error": str(exc), "category": "user"}, status_code=exc.status)
    assert isinstance(exc, EngineError)
    user = getattr(exc, "category", "Server") == "User"
    return JSONResponse(
        {"error": str(exc), "category": wire_category(exc.category)}, status_code=400 if user else 500
    )


def validation_message(errors: list[dict[str, Any]]) -> str:
    """Name the fields a request body got wrong, e.g. 'lora_config.rank: Input should be greater than 0'."""
    parts = [".".join(str(p) for p in e.get("loc", ()) if p != "body") + f": {e.get('msg')}" for e in errors]
    return "invalid request body: " + "; ".join(parts) if parts else "invalid request body"
