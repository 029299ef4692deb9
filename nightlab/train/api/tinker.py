"""The Tinker wire protocol over FastAPI, so the official `tinker` SDK and its cookbook run unmodified here.

Long operations answer `{request_id}` at once and run in the background: training requests of one model in
`seq_id` order (futures.OrderedQueue), sampling requests batched per set of weights (futures.BatchQueue). The
client polls `/retrieve_future`. forward_backward requests and their results, and sampling results, travel as
protobuf messages of the SDK's own `tinker_public_pb2`; everything else is JSON.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import zstandard
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.message import DecodeError
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from tinker.proto import tinker_public_pb2 as pb

from nightlab.train.api.openai import BudgetForcingBody
from nightlab.train.checkpoints import NAME_RE, CheckpointStore, iso
from nightlab.train.engine import AdamParams, Datum, Engine, EngineError, LoraSpec
from nightlab.train.futures import BatchQueue, FutureStore, OrderedQueue, Payload, UserError
from nightlab.train.sampling import (
    BudgetForcing,
    SampleRequest,
    SampleResult,
    SamplingInputError,
    SamplingParams,
)
from nightlab.train.sessions import SessionStore
from nightlab.train.settings import ServeSettings

logger = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
T = TypeVar("T")

# What /client/config tells the SDK: stay on httpx, no JWT exchange, results by polling retrieve_future,
# custom losses client-side. Requests stay uncompressed: on a local link zstd only costs CPU on both ends.
CLIENT_CONFIG: dict[str, Any] = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": True,
    "fwdbwd_max_chunk_len": 256,
    "fwdbwd_max_chunk_bytes_count": 5_000_000,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}


# --- request bodies (unknown keys are ignored: newer SDKs add fields) ---
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CreateSessionBody(_Body):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    display_name: str | None = None


class SessionIdBody(_Body):
    session_id: str


class FinishBody(_Body):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class LoraBody(_Body):
    rank: int = Field(32, ge=1, le=1024)
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class OptimizerConfigBody(_Body):
    model_config = ConfigDict(extra="allow")
    type: str = "adamw"


class CreateModelBody(_Body):
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: LoraBody = LoraBody()
    optimizer_config: OptimizerConfigBody = OptimizerConfigBody()
    user_metadata: dict[str, Any] | None = None


class ModelIdBody(_Body):
    model_id: str


class AdamBody(_Body):
    type: str = "adamw"
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStepBody(_Body):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamBody = Field(validation_alias=AliasChoices("adam_params", "optim_params", "optimizer_params"))


class SaveWeightsBody(_Body):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = Field(None, ge=1)
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveForSamplerBody(SaveWeightsBody):
    sampling_session_seq_id: int | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"


class LoadWeightsBody(_Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: OptimizerConfigBody | None = None


class CreateSamplerBody(_Body):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


class ChunkBody(_Body):
    type: str = "encoded_text"
    tokens: list[int] = []


class ModelInputBody(_Body):
    chunks: list[ChunkBody]


class SamplingParamsBody(_Body):
    max_tokens: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[int] | list[str] | None = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(1.0, gt=0, le=1)


class SampleBody(_Body):
    prompt: ModelInputBody
    sampling_params: SamplingParamsBody
    num_samples: int = Field(1, ge=1, le=1024)
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(0, ge=0)
    topk_sample_logprobs: int = Field(0, ge=0)
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = Field(None, ge=1)
    budget_forcing: BudgetForcingBody | None = Field(
        None, description="nightlab extension: s1-style min/max thinking length (see docs/recipes.md)"
    )


class RetrieveBody(_Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoBody(_Body):
    tinker_path: str


# --- protobuf <-> engine types ---
_NP_OF_DTYPE = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


def _tensor(name: str, t: pb.Tensor) -> np.ndarray:
    """A loss_fn_inputs tensor, dense or sparse CSR (unlisted cells are 0), as a numpy array of its shape."""
    shape = [int(s) for s in t.shape]
    try:
        if t.dtype == pb.DTYPE_BFLOAT16:
            decode = lambda b: (np.frombuffer(b, np.uint16).astype(np.uint32) << 16).view(np.float32)  # noqa: E731
        else:
            decode = lambda b: np.frombuffer(b, _NP_OF_DTYPE[t.dtype])  # noqa: E731
        if t.WhichOneof("encoding") == "sparse_csr":
            values = decode(t.sparse_csr.values)
            crow = np.frombuffer(t.sparse_csr.crow_indices, np.int64)
            col = np.frombuffer(t.sparse_csr.col_indices, np.int64)
            if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
                raise ValueError("sparse tensor needs a 2-D shape, rows+1 row pointers and one column per value")
            dense = np.zeros(shape, dtype=values.dtype)
            rows = np.repeat(np.arange(shape[0]), np.diff(crow))
            dense[rows, col] = values
            return dense
        arr = decode(t.dense).copy()
        return arr.reshape(shape) if shape else arr
    except (KeyError, ValueError, IndexError) as exc:
        raise UserError(f"malformed tensor loss_fn_inputs[{name!r}]: {exc}") from exc


def _datum(i: int, d: pb.Datum) -> Datum:
    tokens: list[int] = []
    for chunk in d.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UserError(f"datum {i}: {kind} chunks are not supported here; send token chunks (encoded_text)")
        if len(chunk.encoded_text.tokens) % 4:
            raise UserError(f"datum {i}: token bytes are not a whole number of int32 values")
        tokens.extend(np.frombuffer(chunk.encoded_text.tokens, np.int32).tolist())
    if not tokens:
        raise UserError(f"datum {i} has no tokens")
    return Datum(tokens=tokens, loss_fn_inputs={k: _tensor(k, v) for k, v in d.loss_fn_inputs.items()})


@dataclass
class FwdBwdRequest:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None
    forward_only: bool
    data: list[Datum]


def decode_forward_backward(body: bytes, content_encoding: str | None) -> FwdBwdRequest:
    """Parse the SDK's protobuf ForwardBackwardRequest (zstd-compressed when it says so)."""
    if content_encoding and content_encoding.lower() == "zstd":
        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 31)
        except zstandard.ZstdError as exc:
            raise UserError(f"body says Content-Encoding: zstd but does not decompress: {exc}") from exc
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise UserError(f"malformed protobuf ForwardBackwardRequest: {exc}") from exc
    if not msg.model_id:
        raise UserError("ForwardBackwardRequest has no model_id")
    if not msg.data:
        raise UserError("ForwardBackwardRequest has no data")
    config: dict[str, float | str] = {k: v for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        config[k] = v.text if v.WhichOneof("value") == "text" else v.number
    return FwdBwdRequest(
        model_id=msg.model_id, seq_id=msg.seq_id, loss_fn=msg.loss_fn or "cross_entropy",
        loss_fn_config=config or None, forward_only=msg.forward_only,
        data=[_datum(i, d) for i, d in enumerate(msg.data)],
    )


def _batched(arrays: list[np.ndarray]) -> pb.BatchedTensor:
    is_float = np.issubdtype(arrays[0].dtype, np.floating)
    dtype = np.float32 if is_float else np.int64
    blobs = [np.ascontiguousarray(a, dtype=dtype).tobytes() for a in arrays]
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    return pb.BatchedTensor(
        data=b"".join(blobs), offsets=offsets.tobytes(), dtype=pb.DTYPE_FLOAT32 if is_float else pb.DTYPE_INT64,
        trailing_shape=list(arrays[0].shape[1:]),
    )


def encode_forward_backward(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput: one ArrayRecord per run of datums whose fields share trailing shapes."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics={k: float(v) for k, v in metrics.items()})
    outputs = [{k: np.asarray(v) for k, v in o.items()} for o in outputs]

    def signature(o: dict[str, np.ndarray]) -> tuple:
        return tuple(sorted((k, v.shape[1:], np.issubdtype(v.dtype, np.floating)) for k, v in o.items()))

    start = 0
    while start < len(outputs):
        end = start + 1
        while end < len(outputs) and signature(outputs[end]) == signature(outputs[start]):
            end += 1
        group = outputs[start:end]
        record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(group))
        for name in group[0]:
            record.fields[name].CopyFrom(_batched([o[name] for o in group]))
        start = end
    return msg.SerializeToString()


def encode_sample(result: SampleResult, last_n: int | None) -> bytes:
    """SampleResponse: int32 tokens, float32 logprobs, NaN where a prompt logprob does not exist."""
    msg = pb.SampleResponse()
    for seq in result.sequences:
        out = msg.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq.tokens, np.int32).tobytes(),
            logprobs=np.asarray(seq.logprobs, np.float32).tobytes(),
        )
        if seq.topk_logprobs:
            out.topk_sampled_logprobs.CopyFrom(_topk(seq.topk_logprobs))
    hide = (lambda n: max(0, n - last_n)) if last_n else (lambda n: 0)
    if result.prompt_logprobs is not None:
        lp = [np.nan if v is None else v for v in result.prompt_logprobs]
        lp[: hide(len(lp))] = [np.nan] * hide(len(lp))
        msg.prompt_logprobs = np.asarray(lp, np.float32).tobytes()
    if result.topk_prompt_logprobs:
        rows = list(result.topk_prompt_logprobs)
        rows[: hide(len(rows))] = [None] * hide(len(rows))
        msg.topk_prompt_logprobs.CopyFrom(_topk(rows))
    return msg.SerializeToString()


def _topk(rows: list[list[tuple[int, float]] | None]) -> pb.TopkLogprobs:
    """Rows of (token, logprob) pairs as the protocol's dense N x K matrices; empty cells are (0, -99999)."""
    k = max((len(r) for r in rows if r), default=0)
    ids = np.zeros((len(rows), k), np.int32)
    lps = np.full((len(rows), k), -99999.0, np.float32)
    for i, row in enumerate(rows):
        for j, (tok, val) in enumerate(row or []):
            ids[i, j], lps[i, j] = tok, val
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=lps.tobytes(), k=k, length=len(rows))


def _sampling_params(p: SamplingParamsBody) -> SamplingParams:
    stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    return SamplingParams(
        max_tokens=p.max_tokens if p.max_tokens is not None else SamplingParams.max_tokens,
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed,
        stop_strings=[s for s in stop if isinstance(s, str)],
        stop_token_ids=[s for s in stop if isinstance(s, int)],
        stop_at_eos=p.stop is None or bool(stop),  # Tinker: stop=[] runs to max_tokens
    )


def _adam(p: AdamBody) -> AdamParams:
    if p.type != "adamw":
        raise UserError(f"optimizer {p.type!r} is not supported here; use AdamParams")
    return AdamParams(**p.model_dump(exclude={"type"}))


def _check_optimizer(config: OptimizerConfigBody | None) -> None:
    if config is not None and config.type != "adamw":
        raise UserError(f"optimizer {config.type!r} is not supported here; only AdamW ('adamw')")


# --- the service ---
@dataclass
class TrainingModel:
    model_id: str
    owner: str
    session_id: str
    base_model: str
    queue: OrderedQueue


@dataclass
class Sampler:
    sampler_id: str
    owner: str
    session_id: str
    base_model: str
    model_path: str | None
    adapter_dir: Path | None


class TinkerService:
    """State behind the routes: the engine, sessions, checkpoints, live training models, samplers and futures."""

    def __init__(self, settings: ServeSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.sessions = SessionStore(settings.data_dir, settings.api_keys)
        self.checkpoints = CheckpointStore(settings.data_dir)
        self.futures = FutureStore(ttl_s=settings.future_ttl_s)
        self.models: dict[str, TrainingModel] = {}
        self.samplers: dict[str, Sampler] = {}
        self.sampling: BatchQueue[tuple[str, Path | None], SampleRequest, SampleResult] = BatchQueue(
            self._sample_batch, window_s=settings.sample_batch_window_s, max_batch=settings.sample_max_batch
        )

    async def close(self) -> None:
        """Let in-flight work finish briefly, then stop; checkpoints are atomic, so nothing is left half-written."""
        await self.futures.close(grace_s=10.0)
        for model in self.models.values():
            model.queue.close()
        self.sessions.close()
        self.checkpoints.close()

    @staticmethod
    async def call(fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking engine call in a worker thread so the event loop keeps answering polls."""
        return await asyncio.to_thread(fn, *args)

    def model(self, model_id: str, owner: str) -> TrainingModel:
        model = self.models.get(model_id)
        if model is None:
            raise UserError(
                f"unknown model_id {model_id!r}: models live in memory, so after a server restart resume from a "
                "checkpoint with ServiceClient.create_training_client_from_state(path)", 404,
            )
        if model.owner != owner:
            raise UserError(f"model {model_id!r} belongs to another API key", 403)
        return model

    def sampler(self, sampler_id: str, owner: str) -> Sampler:
        sampler = self.samplers.get(sampler_id)
        if sampler is None:
            raise UserError(f"unknown sampling session {sampler_id!r}", 404)
        if sampler.owner != owner:
            raise UserError(f"sampling session {sampler_id!r} belongs to another API key", 403)
        return sampler

    def _new_model(self, model_id: str, owner: str, session_id: str, base_model: str, kind: str,
                   first: Callable[[], Awaitable[Payload]]) -> str:
        """Register a model whose first request (seq_id 0: create or load) is `first`; a retry gets the same id."""
        if model_id in self.models:
            return self.model(model_id, owner).queue.submit(owner, 0, kind, first)
        queue = OrderedQueue(model_id, self.futures, next_seq=0, gap_timeout_s=self.settings.seq_gap_timeout_s)
        self.models[model_id] = TrainingModel(model_id, owner, session_id, base_model, queue)

        async def guarded() -> Payload:
            try:
                return await first()
            except BaseException:
                self.models.pop(model_id, None)  # a failed creation leaves nothing behind; the client may retry
                queue.close()
                raise

        return queue.submit(owner, 0, kind, guarded)

    # -- training --
    def create_model(self, owner: str, body: CreateModelBody) -> str:
        self.sessions.active(body.session_id, owner)
        _check_optimizer(body.optimizer_config)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        lora = LoraSpec(**body.lora_config.model_dump())

        async def work() -> Payload:
            await self.call(self.engine.create_adapter, model_id, body.base_model, lora)
            info = await self.call(self.engine.model_info, body.base_model)
            self.models[model_id].base_model = info.name
            self.checkpoints.add_run(model_id, owner, body.session_id, info.name, asdict(lora), body.user_metadata)
            return Payload({"model_id": model_id, "type": "create_model"})

        return self._new_model(model_id, owner, body.session_id, body.base_model, "create_model", work)

    async def get_info(self, owner: str, model_id: str) -> dict[str, Any]:
        model = self.model(model_id, owner)
        info = await self.call(self.engine.model_info, model.base_model)
        _, lora = await self.call(self.engine.adapter_info, model_id)
        return {
            "type": "get_info", "model_id": model_id, "model_name": info.name, "is_lora": True,
            "lora_rank": lora.rank, "optimizer_config": {"type": "adamw"},
            "model_data": {"arch": info.arch, "model_name": info.name, "tokenizer_id": info.tokenizer_id},
        }

    def forward_backward(self, owner: str, req: FwdBwdRequest) -> str:
        model = self.model(req.model_id, owner)

        async def work() -> Payload:
            result = await self.call(
                self.engine.forward_backward, req.model_id, req.data, req.loss_fn, req.loss_fn_config, req.forward_only
            )
            self.checkpoints.touch_run(req.model_id)
            return Payload(encode_forward_backward(result.outputs, result.metrics), PROTOBUF)

        return model.queue.submit(owner, req.seq_id, "forward_backward", work)

    def optim_step(self, owner: str, body: OptimStepBody) -> str:
        model = self.model(body.model_id, owner)
        adam = _adam(body.adam_params)

        async def work() -> Payload:
            metrics = await self.call(self.engine.optim_step, body.model_id, adam)
            self.checkpoints.touch_run(body.model_id)
            return Payload({"metrics": {k: float(v) for k, v in metrics.items()}})

        return model.queue.submit(owner, body.seq_id, "optim_step", work)

    def save_weights(self, owner: str, body: SaveWeightsBody, for_sampler: bool) -> str:
        model = self.model(body.model_id, owner)
        name = body.path or f"step-{body.seq_id or 0:06d}"
        if not NAME_RE.match(name):
            raise UserError(f"invalid checkpoint name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
        kind = "sampler" if for_sampler else "training"
        tag = "save_weights_for_sampler" if for_sampler else "save_weights"

        async def work() -> Payload:
            ckpt = await self.call(
                lambda: self.checkpoints.save(
                    model.model_id, owner, kind, name,
                    lambda d: self.engine.save_adapter(model.model_id, d, not for_sampler),
                    overwrite=body.overwrite, user_metadata=body.user_metadata, ttl_seconds=body.ttl_seconds,
                )
            )
            return Payload({"path": ckpt.tinker_path, "type": tag})

        return model.queue.submit(owner, body.seq_id, tag, work)

    def save_for_sampler(self, owner: str, body: SaveForSamplerBody) -> str:
        """Named: a sampler checkpoint. Unnamed: a snapshot only this process samples from (both kinds snapshot)."""
        if body.path is not None or body.sampling_session_seq_id is None:
            return self.save_weights(owner, body, for_sampler=True)
        model = self.model(body.model_id, owner)
        sampler_id = f"{model.session_id}:sample:{body.sampling_session_seq_id}"
        directory = self.checkpoints.ephemeral_dir(sampler_id.replace(":", "_"))

        async def work() -> Payload:
            await self.call(self.engine.save_adapter, model.model_id, directory, False)
            self.samplers[sampler_id] = Sampler(sampler_id, owner, model.session_id, model.base_model, None, directory)
            return Payload({"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})

        return model.queue.submit(owner, body.seq_id, "save_weights_for_sampler", work)

    def load_weights(self, owner: str, body: LoadWeightsBody) -> str:
        run, ckpt = self.checkpoints.resolve(body.path, owner)
        if body.optimizer and ckpt.kind != "training":
            raise UserError(f"{body.path} holds sampler weights without optimizer state; load a .../weights/... path")
        if body.base_model and body.base_model != run.base_model:
            raise UserError(f"{body.path} was trained on {run.base_model!r}, not {body.base_model!r}")

        def payload(model_id: str) -> Payload:
            return Payload({"path": body.path, "model_id": model_id, "type": "load_weights"})

        if body.session_id is not None:  # a new training client from the checkpoint
            if body.model_seq_id is None:
                raise UserError("load_weights with session_id needs model_seq_id")
            self.sessions.active(body.session_id, owner)
            _check_optimizer(body.optimizer_config)
            model_id = f"{body.session_id}:train:{body.model_seq_id}"

            async def create() -> Payload:
                await self.call(self.engine.load_adapter, model_id, run.base_model, ckpt.directory, body.optimizer)
                self.checkpoints.add_run(model_id, owner, body.session_id, run.base_model, run.lora, body.user_metadata)
                return payload(model_id)

            return self._new_model(model_id, owner, body.session_id, run.base_model, "load_weights", create)
        if body.model_id is None:
            raise UserError("load_weights needs either session_id + model_seq_id or model_id + seq_id")
        model = self.model(body.model_id, owner)
        if model.base_model != run.base_model:
            raise UserError(f"{body.path} was trained on {run.base_model!r}; model {model.model_id} uses {model.base_model!r}")

        async def load() -> Payload:
            await self.call(self.engine.load_adapter, model.model_id, model.base_model, ckpt.directory, body.optimizer)
            return payload(model.model_id)

        return model.queue.submit(owner, body.seq_id, "load_weights", load)

    # -- sampling --
    async def create_sampler(self, owner: str, body: CreateSamplerBody) -> str:
        self.sessions.active(body.session_id, owner)
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        if body.model_path:
            run, ckpt = self.checkpoints.resolve(body.model_path, owner)
            base, adapter_dir = run.base_model, ckpt.directory
        elif body.base_model:
            base, adapter_dir = (await self.call(self.engine.model_info, body.base_model)).name, None
        else:
            raise UserError("create_sampling_session needs model_path or base_model")
        self.samplers[sampler_id] = Sampler(sampler_id, owner, body.session_id, base, body.model_path, adapter_dir)
        return sampler_id

    def _sample_batch(
        self, key: tuple[str, Path | None], requests: list[SampleRequest]
    ) -> list[SampleResult | BaseException]:
        """One engine call for the whole batch; if a request in it is invalid, rerun one by one so only it fails."""
        try:
            return list(self.engine.sample(key[0], key[1], requests))
        except SamplingInputError as exc:
            if len(requests) == 1:
                return [UserError(str(exc))]
            return [self._sample_batch(key, [r])[0] for r in requests]

    async def asample(self, owner: str, body: SampleBody) -> dict[str, Any]:
        if body.prompt_alt_tokens_k or body.target_prompt_logprobs is not None:
            raise UserError("prompt_alt_tokens_k and target_prompt_logprobs are not supported by this server")
        if body.sampling_session_id:
            sampler = self.sampler(body.sampling_session_id, owner)
            base, adapter_dir = sampler.base_model, sampler.adapter_dir
        elif body.model_path:
            run, ckpt = self.checkpoints.resolve(body.model_path, owner)
            base, adapter_dir = run.base_model, ckpt.directory
        elif body.base_model:
            base, adapter_dir = body.base_model, None
        else:
            raise UserError("asample needs sampling_session_id, model_path or base_model")
        tokens: list[int] = []
        for chunk in body.prompt.chunks:
            if chunk.type != "encoded_text":
                raise UserError(f"{chunk.type} chunks are not supported here; send token chunks (encoded_text)")
            tokens.extend(chunk.tokens)
        if not tokens:
            raise UserError("the prompt has no tokens")
        if body.prompt_logprobs_last_n is not None and not 1 <= body.prompt_logprobs_last_n < len(tokens):
            raise UserError(f"prompt_logprobs_last_n must be between 1 and {len(tokens) - 1} for this prompt")
        request = SampleRequest(
            prompt_tokens=tokens, params=_sampling_params(body.sampling_params), num_samples=body.num_samples,
            prompt_logprobs=bool(body.prompt_logprobs), topk_prompt_logprobs=body.topk_prompt_logprobs,
            topk_sample_logprobs=body.topk_sample_logprobs,
            budget_forcing=BudgetForcing(**body.budget_forcing.model_dump()) if body.budget_forcing else None,
        )

        async def work() -> Payload:
            result = await self.sampling.submit((base, adapter_dir), request)
            return Payload(encode_sample(result, body.prompt_logprobs_last_n), PROTOBUF)

        request_id = self.futures.start(owner, work)
        return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)]}

    # -- REST views --
    def training_run_json(self, run_id: str, owner: str) -> dict[str, Any]:
        run = self.checkpoints.run(run_id, owner)
        ckpts = self.checkpoints.checkpoints(run_id, owner)
        last = {kind: next((c.to_json() for c in reversed(ckpts) if c.kind == kind), None) for kind in ("training", "sampler")}
        return {
            "training_run_id": run.run_id, "base_model": run.base_model, "model_owner": run.owner, "is_lora": True,
            "corrupted": False, "lora_rank": run.lora.get("rank"), "last_request_time": iso(run.last_request_time),
            "last_checkpoint": last["training"], "last_sampler_checkpoint": last["sampler"],
            "user_metadata": {k: str(v) for k, v in run.user_metadata.items()} if run.user_metadata else None,
        }


# --- routes ---
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
        return CLIENT_CONFIG

    @router.post("/client/dynamic_config")
    async def client_dynamic_config(who: str = Owner) -> dict[str, Any]:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @router.post("/telemetry")
    async def telemetry(request: Request) -> dict[str, str]:
        return {"status": "accepted"}

    @router.post("/create_session")
    async def create_session(body: CreateSessionBody, who: str = Owner) -> dict[str, Any]:
        session = service.sessions.create(who, body.tags, body.user_metadata, body.display_name, body.sdk_version)
        return {"type": "create_session", "session_id": session.session_id}

    @router.post("/session_heartbeat")
    async def session_heartbeat(body: SessionIdBody, who: str = Owner) -> dict[str, str]:
        service.sessions.heartbeat(body.session_id, who)
        return {"type": "session_heartbeat"}

    @router.post("/sessions/{session_id}/finish")
    async def finish_session(session_id: str, body: FinishBody, who: str = Owner) -> dict[str, str]:
        service.sessions.finish(session_id, who, body.reason, body.detail)
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
        return {"training_run_ids": [r.run_id for r in runs], "sampler_ids": samplers, "user_metadata": metadata,
                "display_name": session.display_name}

    @router.get("/get_server_capabilities")
    async def capabilities(who: str = Owner) -> dict[str, Any]:
        models = await service.call(service.engine.models)
        return {"supported_models": [
            {"model_name": m.name, "max_context_length": m.max_context_length, "trainable": True, "sampleable": True}
            for m in models
        ]}

    @router.post("/create_model")
    async def create_model(body: CreateModelBody, who: str = Owner) -> dict[str, Any]:
        return _future(service.create_model(who, body))

    @router.post("/get_info")
    async def get_info(body: ModelIdBody, who: str = Owner) -> dict[str, Any]:
        return await service.get_info(who, body.model_id)

    @router.post("/forward_backward")
    async def forward_backward(request: Request, who: str = Owner) -> dict[str, Any]:
        if PROTOBUF not in request.headers.get("content-type", ""):
            raise UserError(f"forward_backward takes a protobuf body ({PROTOBUF}), as the tinker SDK sends", 415)
        req = decode_forward_backward(await request.body(), request.headers.get("content-encoding"))
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
        return {"type": "create_sampling_session", "sampling_session_id": await service.create_sampler(who, body)}

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
        return {"base_model": run.base_model, "is_lora": True, "lora_rank": lora.get("rank"),
                "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
                "train_attn": lora.get("train_attn"), "optimizer_config": {"type": "adamw"}}

    @router.get("/training_runs")
    async def list_training_runs(limit: int = 20, offset: int = 0, who: str = Owner) -> dict[str, Any]:
        runs, total = service.checkpoints.runs(who, limit, offset)
        return {"training_runs": [service.training_run_json(r.run_id, who) for r in runs],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

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
        return {"checkpoints": [c.to_json() for c in ckpts],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    return router


def wire_category(category: str) -> str:
    """The SDK parses categories as its RequestErrorCategory values, which are lower case ("user", "server")."""
    return category.lower()


def error_response(exc: Exception) -> JSONResponse:
    """A user error (or an engine error the user caused) as a 4xx JSON body that says what to fix."""
    if isinstance(exc, UserError):
        return JSONResponse({"error": str(exc), "category": "user"}, status_code=exc.status)
    assert isinstance(exc, EngineError)
    user = getattr(exc, "category", "Server") == "User"
    return JSONResponse({"error": str(exc), "category": wire_category(exc.category)}, status_code=400 if user else 500)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """Name the fields a request body got wrong, e.g. 'lora_config.rank: Input should be greater than 0'."""
    parts = [".".join(str(p) for p in e.get("loc", ()) if p != "body") + f": {e.get('msg')}" for e in errors]
    return "invalid request body: " + "; ".join(parts) if parts else "invalid request body"

