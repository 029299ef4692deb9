"""Request futures and queues, shaped by the Tinker protocol.

Every long operation answers at once with a request id that the client polls (`retrieve_future`); the result is
kept until it is fetched or expires. Training requests of one model run strictly in `seq_id` order, each exactly
once even when the client retries; sampling requests for the same weights are gathered into batches, because a
batch of generations costs little more than one on the same hardware.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

logger = logging.getLogger(__name__)

Category = Literal["User", "Server"]
K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
T = TypeVar("T")


class UserError(Exception):
    """A request the client got wrong; `status` is the HTTP code when it is answered directly."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Payload:
    """A finished result as it goes on the wire: JSON, or protobuf bytes where the SDK expects them."""

    body: dict[str, Any] | bytes
    media_type: str = "application/json"


@dataclass
class Future:
    request_id: str
    owner: str
    created_at: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    payload: Payload | None = None
    error: tuple[str, Category] | None = None
    finished_at: float | None = None

    def finish(self, payload: Payload | None = None, error: tuple[str, Category] | None = None) -> None:
        self.payload, self.error = payload, error
        self.finished_at = time.monotonic()
        self.done.set()


def describe_failure(exc: BaseException) -> tuple[str, Category]:
    """Map an exception to the protocol's `{error, category}`: user mistakes are 'User', the rest 'Server'."""
    if isinstance(exc, UserError):
        return str(exc), "User"
    category = getattr(exc, "category", None)  # engine errors carry their own category
    if category in ("User", "Server"):
        return str(exc), category
    logger.error("request failed", exc_info=exc)
    return f"internal error: {type(exc).__name__}: {exc}", "Server"


class FutureStore:
    """Holds every request's future until the client has fetched it, or until it expires."""

    def __init__(self, ttl_s: float = 3600.0) -> None:
        self._ttl_s = ttl_s
        self._futures: dict[str, Future] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def create(self, owner: str) -> Future:
        self._prune()
        future = Future(request_id=f"req-{uuid.uuid4().hex}", owner=owner)
        self._futures[future.request_id] = future
        return future

    async def run(self, future: Future, work: Callable[[], Awaitable[Payload]]) -> None:
        """Run `work` and record its outcome on `future`; never raises, the client learns of failures by polling."""
        try:
            future.finish(payload=await work())
        except asyncio.CancelledError:
            future.finish(error=("the server shut down before this request ran; send it again", "Server"))
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes the future's error
            future.finish(error=describe_failure(exc))

    def start(self, owner: str, work: Callable[[], Awaitable[Payload]]) -> str:
        """Create a future and run `work` for it in the background; return the request id."""
        future = self.create(owner)
        task = asyncio.get_running_loop().create_task(self.run(future, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future.request_id

    def get(self, request_id: str, owner: str) -> Future:
        future = self._futures.get(request_id)
        if future is None:
            raise UserError(f"unknown request_id {request_id!r} (results are kept {self._ttl_s:.0f} s)", 404)
        if future.owner != owner:
            raise UserError(f"request {request_id!r} belongs to another API key", 403)
        return future

    async def wait(self, future: Future, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the result; False means still pending (the client polls again)."""
        try:
            await asyncio.wait_for(future.done.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _prune(self) -> None:
        now = time.monotonic()
        expired = [k for k, f in self._futures.items() if f.finished_at and now - f.finished_at > self._ttl_s]
        for key in expired:
            del self._futures[key]

    async def close(self, grace_s: float) -> None:
        """Let running work finish for up to `grace_s`, then cancel the rest so nothing runs half-way at exit."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


class OrderedQueue:
    """Runs one model's requests one at a time in `seq_id` order, each exactly once.

    Requests may arrive out of order (the SDK sends the chunks of one forward_backward in parallel); a request
    waits for its predecessors. A retried request (same seq_id) gets the first request's id back and is never
    applied again. If a predecessor does not arrive within `gap_timeout_s`, the waiting requests fail with a
    message naming the missing seq_id, and the queue moves past them.
    """

    def __init__(self, name: str, futures: FutureStore, *, next_seq: int = 1, gap_timeout_s: float = 120.0) -> None:
        self._name = name
        self._futures = futures
        self._next = next_seq
        self._gap_timeout_s = gap_timeout_s
        self._seen: dict[int, tuple[str, str]] = {}  # seq_id -> (kind, request_id)
        self._pending: dict[int, tuple[Future, Callable[[], Awaitable[Payload]]]] = {}
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    def submit(self, owner: str, seq_id: int | None, kind: str, work: Callable[[], Awaitable[Payload]]) -> str:
        """Queue `work` (a `kind` request) at `seq_id` (None: after everything seen so far); return its request id."""
        if seq_id is None:
            seq_id = max([self._next - 1, *self._seen]) + 1
        if seq_id in self._seen:
            seen_kind, request_id = self._seen[seq_id]
            if seen_kind != kind:
                raise UserError(
                    f"seq_id {seq_id} of {self._name} was already used by a {seen_kind} request; each request to "
                    "a model needs its own seq_id"
                )
            return request_id
        if seq_id < self._next:
            raise UserError(
                f"seq_id {seq_id} for {self._name} comes after seq_id {self._next - 1} already ran; "
                f"the next request must use seq_id {self._next} or later"
            )
        future = self._futures.create(owner)
        self._seen[seq_id] = (kind, future.request_id)
        self._pending[seq_id] = (future, work)
        self._arrived.set()
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return future.request_id

    async def _run(self) -> None:
        while True:
            if self._next in self._pending:
                future, work = self._pending.pop(self._next)
                self._next += 1
                await self._futures.run(future, work)
                continue
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), self._gap_timeout_s if self._pending else None)
            except TimeoutError:
                self._give_up_gap()

    def _give_up_gap(self) -> None:
        waiting = sorted(self._pending)
        message = (
            f"seq_id {self._next} of {self._name} never arrived (waited {self._gap_timeout_s:.0f} s), so "
            f"seq_id {waiting[0]} cannot run; requests to one model must carry consecutive seq_ids"
        )
        for seq in waiting:
            self._pending.pop(seq)[0].finish(error=(message, "User"))
        self._next = waiting[-1] + 1

    def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()


class BatchQueue(Generic[K, R, T]):
    """Gathers items submitted for the same key within a short window and runs them as one batch.

    `run_batch(key, items)` is synchronous (it runs in a worker thread) and returns one result per item; an
    exception in that list fails only its own item, a raised one fails the whole batch.
    """

    def __init__(self, run_batch: Callable[[K, list[R]], list[T | BaseException]], *, window_s: float, max_batch: int) -> None:
        self._run_batch = run_batch
        self._window_s = window_s
        self._max_batch = max_batch
        self._pending: dict[K, list[tuple[R, asyncio.Future[T]]]] = {}
        self._workers: dict[K, asyncio.Task[None]] = {}

    async def submit(self, key: K, item: R) -> T:
        result: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((item, result))
        if key not in self._workers:
            self._workers[key] = asyncio.get_running_loop().create_task(self._drain(key))
        return await result

    async def _drain(self, key: K) -> None:
        try:
            while self._pending.get(key):
                await asyncio.sleep(self._window_s)
                queue = self._pending[key]
                batch, self._pending[key] = queue[: self._max_batch], queue[self._max_batch :]
                live = [(item, fut) for item, fut in batch if not fut.cancelled()]
                if not live:
                    continue
                try:
                    results = await asyncio.to_thread(self._run_batch, key, [item for item, _ in live])
                except Exception as exc:  # noqa: BLE001 - the whole batch shares the failure
                    for _, fut in live:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), res in zip(live, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
        finally:
            del self._workers[key]
            if not self._pending.get(key):
                self._pending.pop(key, None)
