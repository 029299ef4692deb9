"""The state behind the Tinker routes: sessions, live training models, samplers, checkpoints and futures.

Long operations answer `{request_id}` at once and run in the background: training requests of one model in
`seq_id` order (futures.OrderedQueue), sampling requests batched per set of weights (futures.BatchQueue). What
a session holds in memory (adapters, samplers, unnamed sampler weights) is freed when it finishes or stops
sending heartbeats; named checkpoints stay on disk and loadable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from nightlab.train.aliases import AliasStore
from nightlab.train.api.bodies import (
    AdamBody,
    CreateModelBody,
    CreateSamplerBody,
    LoadWeightsBody,
    OptimizerConfigBody,
    OptimStepBody,
    SampleBody,
    SamplingParamsBody,
    SaveForSamplerBody,
    SaveWeightsBody,
)
from nightlab.train.api.wire import PROTOBUF, FwdBwdRequest, encode_forward_backward, encode_sample
from nightlab.train.checkpoints import CheckpointStore, check_new_checkpoint, iso
from nightlab.train.engine import Engine
from nightlab.train.errors import EngineError, UserError
from nightlab.train.feedback import FeedbackStore
from nightlab.train.futures import BatchQueue, FutureStore, OrderedQueue, Payload, settle
from nightlab.train.records import AdamParams, Datum, LoraSpec, ModelInfo
from nightlab.train.sampling import BudgetForcing, SampleRequest, SampleResult, SamplingParams
from nightlab.train.sessions import SessionStore, check_count
from nightlab.train.settings import ServeSettings
from nightlab.train.stability import StabilityStore

logger = logging.getLogger(__name__)

T = TypeVar("T")
SWEEP_EVERY_S = 30.0  # how often to look for silent sessions and old results (more often for short timeouts)


def _sampling_params(p: SamplingParamsBody) -> SamplingParams:
    stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    return SamplingParams(
        max_tokens=p.max_tokens if p.max_tokens is not None else SamplingParams.max_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        seed=p.seed,
        stop_strings=[s for s in stop if isinstance(s, str)],
        stop_token_ids=[s for s in stop if isinstance(s, int)],
        stop_at_eos=p.stop is None or bool(stop),  # Tinker: stop=[] runs to max_tokens
    )


def _adam(p: AdamBody) -> AdamParams:
    if p.type != "adamw":
        raise UserError(f"optimizer {p.type!r} is not supported here; use AdamParams")
    nulls = sorted(name for name in p.model_fields_set if getattr(p, name) is None)
    if nulls:  # left out is a default; null is what the SDK sends for NaN and infinity
        raise UserError(f"null Adam parameters (NaN or infinite?): {', '.join(nulls)}; send finite numbers")
    return AdamParams(**p.model_dump(exclude={"type"}, exclude_none=True))


def _check_optimizer(config: OptimizerConfigBody | None) -> None:
    if config is not None and config.type != "adamw":
        raise UserError(f"optimizer {config.type!r} is not supported here; only AdamW ('adamw')")


@dataclass
class TrainingModel:
    model_id: str
    owner: str
    session_id: str
    base_model: str
    queue: OrderedQueue
    max_context_length: int = 0  # known once the model is created; 0 while unknown or unlimited

    def check_fits(self, data: list[Datum]) -> None:
        """Refuse datums longer than the base model's context: no position past it was ever trained."""
        limit = self.max_context_length
        for i, datum in enumerate(data):
            if limit and len(datum.tokens) > limit:
                raise UserError(
                    f"datum {i} has {len(datum.tokens)} tokens, more than the context of "
                    f"{self.base_model} ({limit} tokens); shorten or split it"
                )


@dataclass
class Sampler:
    sampler_id: str
    owner: str
    session_id: str
    base_model: str
    model_path: str | None
    adapter_dir: Path | None


class TinkerService:
    """State behind the routes: the engine, sessions, checkpoints, live training models, samplers, futures."""

    def __init__(self, settings: ServeSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        engine.serve_only([*settings.preload, *settings.allowed_models], settings.max_loaded_bases)
        self.sessions = SessionStore(
            settings.data_dir,
            settings.api_keys,
            max_active=settings.max_active_sessions_per_key,
            max_display_name_chars=settings.max_display_name_chars,
            max_metadata_bytes=settings.max_metadata_bytes,
        )
        self.checkpoints = CheckpointStore(settings.data_dir)
        self.feedback = FeedbackStore(settings.data_dir)
        self.aliases = AliasStore(settings.data_dir)
        self.stability = StabilityStore()
        self.futures = FutureStore(ttl_s=settings.future_ttl_s)
        self.models: dict[str, TrainingModel] = {}
        self.samplers: dict[str, Sampler] = {}
        self.sampling: BatchQueue[tuple[str, Path | None], SampleRequest, SampleResult] = BatchQueue(
            lambda key, requests: engine.sample(*key, requests),
            window_s=settings.sample_batch_window_s,
            max_batch=settings.sample_max_batch,
        )
        self._background: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle --
    def start(self) -> None:
        """Start sweeping for silent sessions and old results (call from the running event loop)."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_EVERY_S, self.settings.session_timeout_s / 4))
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next one
                logger.exception("sweeping sessions failed")

    def sweep(self) -> None:
        """Forget results nobody will fetch, and end sessions whose client stopped sending heartbeats."""
        self.futures.prune()
        self.stability.expire()
        for session_id in self.sessions.expire(self.settings.session_timeout_s):
            logger.info(
                "session %s sent no heartbeat for %.0f s; freeing its adapters",
                session_id,
                self.settings.session_timeout_s,
            )
            self._spawn(self.release_session(session_id))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def finish_session(
        self, owner: str, session_id: str, reason: dict[str, Any] | None, detail: str | None
    ) -> None:
        self.sessions.finish(session_id, owner, reason, detail)
        self._spawn(self.release_session(session_id))

    async def release_session(self, session_id: str) -> None:
        """Free what a session holds in memory: its samplers, and each of its models once the model's queued
        work has run (the adapter, sampler adapters loaded from its unnamed weights, those weights' files)."""
        for sampler_id in [s.sampler_id for s in self.samplers.values() if s.session_id == session_id]:
            del self.samplers[sampler_id]
        self.stability.drop_session(session_id)
        models = [
            self.models.pop(m.model_id) for m in list(self.models.values()) if m.session_id == session_id
        ]
        await asyncio.gather(*(self._release_model(m) for m in models))

    async def _release_model(self, model: TrainingModel) -> None:
        await model.queue.close(self.settings.shutdown_grace_s)
        await self.call(self.engine.forget_samplers, self.checkpoints.ephemeral_dir(model.model_id))
        await self.call(self.checkpoints.drop_ephemeral, model.model_id)
        with contextlib.suppress(EngineError):  # raised when its creation failed: there is no adapter to drop
            await self.call(self.engine.drop_adapter, model.model_id)

    async def close(self) -> None:
        """Stop taking work; give queued training work and running requests up to `shutdown_grace_s` to
        finish, then close the databases. Checkpoints are atomic: work cut off leaves nothing half-written."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        grace = self.settings.shutdown_grace_s
        queued = sum(m.queue.pending for m in self.models.values())
        if queued:
            logger.warning("waiting up to %.0f s for %d queued training request(s) to finish", grace, queued)
        await asyncio.gather(
            *(m.queue.close(grace) for m in self.models.values()),
            self.futures.close(grace),
            settle(set(self._background), grace),
        )
        self.sessions.close()
        self.checkpoints.close()
        self.feedback.close()
        self.aliases.close()

    @staticmethod
    async def call(fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking engine call in a worker thread so the event loop keeps answering polls."""
        return await asyncio.to_thread(fn, *args)

    # -- lookups --
    def model(self, model_id: str, owner: str) -> TrainingModel:
        model = self.models.get(model_id)
        if model is None:
            raise UserError(
                f"unknown model_id {model_id!r}: models live in memory until their session ends, "
                "so after a server restart or a finished session resume from a checkpoint with "
                "ServiceClient.create_training_client_from_state(path)",
                404,
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

    def _new_model(
        self,
        model_id: str,
        owner: str,
        session_id: str,
        base_model: str,
        kind: str,
        first: Callable[[], Awaitable[Payload]],
    ) -> str:
        """Register a model whose first request (seq_id 0: create or load) is `first`; a retry gets its id."""
        if model_id in self.models:
            return self.model(model_id, owner).queue.submit(owner, 0, kind, first)
        held = sum(m.owner == owner for m in self.models.values())
        limit = self.settings.max_training_clients_per_key
        check_count(held, limit, "training clients", "max_training_clients_per_key")
        queue = OrderedQueue(
            model_id, self.futures, next_seq=0, gap_timeout_s=self.settings.seq_gap_timeout_s
        )
        self.models[model_id] = TrainingModel(model_id, owner, session_id, base_model, queue)

        async def guarded() -> Payload:
            try:
                return await first()
            except BaseException:
                self.models.pop(
                    model_id, None
                )  # a failed creation leaves nothing behind; the client may retry
                queue.stop()
                raise

        return queue.submit(owner, 0, kind, guarded)

    @staticmethod
    def _check_in_order(
        model: TrainingModel,
        owner: str,
        seq_id: int | None,
        kind: str,
        check: Callable[[], T],
        chunk: bool = False,
    ) -> T:
        """Run `check`, which may refuse the request (a 400). A refused request still takes its seq_id, if it
        has one, and fails there, so the model's next request does not wait for a seq_id that never comes."""
        try:
            return check()
        except UserError as error:
            refusal = error

        async def refused() -> Payload:
            raise refusal

        if seq_id is not None:
            with contextlib.suppress(UserError):  # the seq_id may be taken already (a retry) or out of order
                model.queue.submit(owner, seq_id, kind, refused, chunk=chunk)
        raise refusal

    # -- training --
    def create_model(self, owner: str, body: CreateModelBody) -> str:
        self.sessions.active(body.session_id, owner)
        _check_optimizer(body.optimizer_config)
        self.engine.canonical_name(body.base_model)  # an unservable model is refused now, not in the future
        self.sessions.check_metadata("user_metadata", body.user_metadata)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        lora = LoraSpec(**body.lora_config.model_dump())

        async def work() -> Payload:
            await self.call(self.engine.create_adapter, model_id, body.base_model, lora)
            info = await self.call(self.engine.model_info, body.base_model)
            self._created(model_id, info)
            self.checkpoints.add_run(
                model_id, owner, body.session_id, info.name, asdict(lora), body.user_metadata
            )
            return Payload({"model_id": model_id, "type": "create_model"})

        return self._new_model(model_id, owner, body.session_id, body.base_model, "create_model", work)

    def _created(self, model_id: str, info: ModelInfo) -> None:
        """Record what a new model's base turned out to be, unless the model was released meanwhile."""
        if model_id in self.models:
            self.models[model_id].base_model = info.name
            self.models[model_id].max_context_length = info.max_context_length

    async def get_info(self, owner: str, model_id: str) -> dict[str, Any]:
        model = self.model(model_id, owner)
        info = await self.call(self.engine.model_info, model.base_model)
        _, lora = await self.call(self.engine.adapter_info, model_id)
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_name": info.name,
            "is_lora": True,
            "lora_rank": lora.rank,
            "optimizer_config": {"type": "adamw"},
            "model_data": {"arch": info.arch, "model_name": info.name, "tokenizer_id": info.tokenizer_id},
        }

    def forward_backward(self, owner: str, req: FwdBwdRequest) -> str:
        model = self.model(req.model_id, owner)

        def checked() -> list[Datum]:
            """The datums, fitted to the context; for stable_reinforce, filled from the recorded samples
            their provenance names (other losses have no use for provenance and ignore it)."""
            model.check_fits(req.data)
            if req.loss_fn != "stable_reinforce":
                return req.data
            return self.stability.resolve(model.session_id, req.data, req.provenance)

        data = self._check_in_order(model, owner, req.seq_id, "forward_backward", checked, chunk=True)

        async def work() -> Payload:
            model.check_fits(data)  # again: a request sent before its model was created is checked now
            result = await self.call(
                self.engine.forward_backward,
                req.model_id,
                data,
                req.loss_fn,
                req.loss_fn_config,
                req.forward_only,
            )
            self.checkpoints.touch_run(req.model_id)
            return Payload(encode_forward_backward(result.outputs, result.metrics), PROTOBUF)

        return model.queue.submit(
            owner, req.seq_id, "forward_backward", work, chunk=True, fingerprint=req.fingerprint
        )

    def optim_step(self, owner: str, body: OptimStepBody) -> str:
        model = self.model(body.model_id, owner)
        adam = self._check_in_order(model, owner, body.seq_id, "optim_step", lambda: _adam(body.adam_params))

        async def work() -> Payload:
            metrics = await self.call(self.engine.optim_step, body.model_id, adam)
            self.checkpoints.touch_run(body.model_id)
            return Payload({"metrics": {k: float(v) for k, v in metrics.items()}})

        return model.queue.submit(owner, body.seq_id, "optim_step", work)

    def save_weights(self, owner: str, body: SaveWeightsBody, for_sampler: bool) -> str:
        model = self.model(body.model_id, owner)
        name = body.path or f"step-{body.seq_id or 0:06d}"
        kind = "sampler" if for_sampler else "training"
        tag = "save_weights_for_sampler" if for_sampler else "save_weights"

        def valid() -> None:
            check_new_checkpoint(name, body.ttl_seconds)
            self.sessions.check_metadata("user_metadata", body.user_metadata)
            held = self.checkpoints.count(owner, besides=(model.model_id, kind, name))
            check_count(held, self.settings.max_checkpoints_per_key, "checkpoints", "max_checkpoints_per_key")

        self._check_in_order(model, owner, body.seq_id, tag, valid)

        async def work() -> Payload:
            ckpt = await self.call(
                lambda: self.checkpoints.save(
                    model.model_id,
                    owner,
                    kind,
                    name,
                    lambda d: self.engine.save_adapter(model.model_id, d, not for_sampler),
                    overwrite=body.overwrite,
                    user_metadata=body.user_metadata,
                    ttl_seconds=body.ttl_seconds,
                )
            )
            return Payload({"path": ckpt.tinker_path, "type": tag})

        return model.queue.submit(owner, body.seq_id, tag, work)

    def save_for_sampler(self, owner: str, body: SaveForSamplerBody) -> str:
        """Named: a sampler checkpoint. Unnamed: weights for this model's samplers only, either a fixed
        `snapshot` or the model's one shared `inflight` target, which each later inflight save updates."""
        if body.path is not None or body.sampling_session_seq_id is None:
            return self.save_weights(owner, body, for_sampler=True)
        model = self.model(body.model_id, owner)
        sampler_id = f"{model.session_id}:sample:{body.sampling_session_seq_id}"

        def save() -> Path:
            def write(directory: Path) -> None:
                self.engine.save_adapter(model.model_id, directory, False)

            if body.kind == "inflight":
                return self.checkpoints.publish_inflight(model.model_id, write)
            directory = (
                self.checkpoints.ephemeral_dir(model.model_id) / f"snapshot-{body.sampling_session_seq_id}"
            )
            write(directory)
            return directory

        async def work() -> Payload:
            directory = await self.call(save)
            if self.models.get(model.model_id) is model:  # not released meanwhile
                self.samplers[sampler_id] = Sampler(
                    sampler_id, owner, model.session_id, model.base_model, None, directory
                )
            return Payload({"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})

        return model.queue.submit(owner, body.seq_id, "save_weights_for_sampler", work)

    def load_weights(self, owner: str, body: LoadWeightsBody) -> str:
        run, ckpt = self.checkpoints.resolve(body.path, owner)
        if body.optimizer and ckpt.kind != "training":
            raise UserError(
                f"{body.path} holds sampler weights without optimizer state; load a .../weights/... path"
            )
        if body.base_model and self.engine.canonical_name(body.base_model) != run.base_model:
            raise UserError(f"{body.path} was trained on {run.base_model!r}, not {body.base_model!r}")

        def payload(model_id: str) -> Payload:
            return Payload({"path": body.path, "model_id": model_id, "type": "load_weights"})

        if body.session_id is not None:  # a new training client from the checkpoint
            if body.model_seq_id is None:
                raise UserError("load_weights with session_id needs model_seq_id")
            self.sessions.active(body.session_id, owner)
            _check_optimizer(body.optimizer_config)
            self.sessions.check_metadata("user_metadata", body.user_metadata)
            model_id = f"{body.session_id}:train:{body.model_seq_id}"

            async def create() -> Payload:
                await self.call(
                    self.engine.load_adapter, model_id, run.base_model, ckpt.directory, body.optimizer
                )
                self._created(model_id, await self.call(self.engine.model_info, run.base_model))
                self.checkpoints.add_run(
                    model_id, owner, body.session_id, run.base_model, run.lora, body.user_metadata
                )
                return payload(model_id)

            return self._new_model(model_id, owner, body.session_id, run.base_model, "load_weights", create)
        if body.model_id is None:
            raise UserError("load_weights needs either session_id + model_seq_id or model_id + seq_id")
        model = self.model(body.model_id, owner)
        if self.engine.canonical_name(model.base_model) != run.base_model:
            raise UserError(
                f"{body.path} was trained on {run.base_model!r}; "
                f"model {model.model_id} uses {model.base_model!r}"
            )

        async def load() -> Payload:
            await self.call(
                self.engine.load_adapter, model.model_id, model.base_model, ckpt.directory, body.optimizer
            )
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
        self.samplers[sampler_id] = Sampler(
            sampler_id, owner, body.session_id, base, body.model_path, adapter_dir
        )
        return sampler_id

    async def asample(self, owner: str, body: SampleBody) -> dict[str, Any]:
        if body.prompt_alt_tokens_k or body.target_prompt_logprobs is not None:
            raise UserError("prompt_alt_tokens_k and target_prompt_logprobs are not supported by this server")
        session_id: str | None = None  # whose recorded sequences these become, with record_stability_info
        if body.sampling_session_id:
            sampler = self.sampler(body.sampling_session_id, owner)
            base, adapter_dir, session_id = sampler.base_model, sampler.adapter_dir, sampler.session_id
        elif body.model_path:
            run, ckpt = self.checkpoints.resolve(body.model_path, owner)
            base, adapter_dir = run.base_model, ckpt.directory
        elif body.base_model:
            base, adapter_dir = body.base_model, None
        else:
            raise UserError("asample needs sampling_session_id, model_path or base_model")
        if body.record_stability_info and session_id is None:
            raise UserError(
                "record_stability_info needs a sampling session: sample through a SamplingClient "
                "(its samples then belong to that session's training)"
            )
        tokens, images = await self.call(body.prompt.parts)  # decoding images takes a while: off the loop
        if not tokens and not images:
            raise UserError("the prompt has no tokens")
        if body.prompt_logprobs_last_n is not None and not 1 <= body.prompt_logprobs_last_n < len(tokens):
            raise UserError(f"prompt_logprobs_last_n must be between 1 and {len(tokens) - 1} for this prompt")
        request = SampleRequest(
            prompt_tokens=tokens,
            params=_sampling_params(body.sampling_params),
            num_samples=body.num_samples,
            prompt_logprobs=bool(body.prompt_logprobs),
            topk_prompt_logprobs=body.topk_prompt_logprobs,
            topk_sample_logprobs=body.topk_sample_logprobs,
            budget_forcing=BudgetForcing(**body.budget_forcing.model_dump()) if body.budget_forcing else None,
            images=images,
        )
        await self.call(self.engine.check_sample, base, request)  # a bad request fails here, not in a batch

        sequence_ids: list[str] = []  # known once the future exists, before its work runs

        async def work() -> Payload:
            result = await self.sampling.submit((base, adapter_dir), request)
            if body.record_stability_info and session_id is not None:
                self.stability.record(
                    session_id, tokens, list(zip(sequence_ids, result.sequences, strict=True))
                )
            return Payload(encode_sample(result, body.prompt_logprobs_last_n), PROTOBUF)

        request_id = self.futures.start(owner, work)
        sequence_ids.extend(f"{request_id}:{i}" for i in range(body.num_samples))
        return {"request_id": request_id, "sample_sequence_ids": sequence_ids}

    # -- REST views --
    def training_run_json(self, run_id: str, owner: str) -> dict[str, Any]:
        run = self.checkpoints.run(run_id, owner)
        ckpts = self.checkpoints.checkpoints(run_id, owner)
        last = {
            kind: next((c.to_json() for c in reversed(ckpts) if c.kind == kind), None)
            for kind in ("training", "sampler")
        }
        return {
            "training_run_id": run.run_id,
            "base_model": run.base_model,
            "model_owner": run.owner,
            "is_lora": True,
            "corrupted": any(c.missing for c in ckpts),  # a checkpoint's files are gone or changed
            "lora_rank": run.lora.get("rank"),
            "last_request_time": iso(run.last_request_time),
            "last_checkpoint": last["training"],
            "last_sampler_checkpoint": last["sampler"],
            "user_metadata": {k: str(v) for k, v in run.user_metadata.items()} if run.user_metadata else None,
        }
