"""Request futures and queues, shaped by the Tinker protocol.

Every long operation answers at once with a request id that the client polls (`retrieve_future`); the result
is kept until it is fetched or expires. Training requests of one model run strictly in `seq_id` order, each
exactly once even when the client retries; sampling requests for the same weights are gathered into batches,
because a batch of generations costs little more than one on the same hardware.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from nightlab.train.errors import UserError

logger = logging.getLogger(__name__)

Category = Literal["User", "Server"]
FETCHED_KEEP_S = 60.0  # a fetched result stays this long, for a client whose read failed and that polls again
SEEN_KEPT = 4096  # seq_ids an OrderedQueue remembers behind the newest, so a late retry gets its first id
K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
T = TypeVar("T")


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
    fetched_at: float | None = None

    def finish(self, payload: Payload | None = None, error: tuple[str, Category] | None = None) -> None:
        self.payload, self.error = payload, error
        self.finished_at = time.monotonic()
        self.done.set()


def is_user_error(exc: BaseException) -> bool:
    """A failure the request itself caused (UserError, or an engine error of category 'User')."""
    return isinstance(exc, UserError) or getattr(exc, "category", None) == "User"


def describe_failure(exc: BaseException) -> tuple[str, Category]:
    """Map an exception to the protocol's `{error, category}`: user mistakes are 'User', the rest 'Server'."""
    if is_user_error(exc):
        return str(exc), "User"
    if getattr(exc, "category", None) == "Server":  # engine errors carry their own category
        return str(exc), "Server"
    logger.error("request failed", exc_info=exc)
    return f"internal error: {type(exc).__name__}: {exc}", "Server"


async def settle(tasks: set[asyncio.Task[Any]], grace_s: float) -> None:
    """Let `tasks` finish for up to `grace_s`, then cancel the rest and wait until they have stopped."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class FutureStore:
    """Holds every request's future until shortly after the client fetched it, or until it expires."""

    def __init__(self, ttl_s: float = 3600.0, fetched_keep_s: float = FETCHED_KEEP_S) -> None:
        self._ttl_s = ttl_s
        self._fetched_keep_s = fetched_keep_s
        self._futures: dict[str, Future] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def create(self, owner: str) -> Future:
        self.prune()
        future = Future(request_id=f"req-{uuid.uuid4().hex}", owner=owner)
        self._futures[future.request_id] = future
        return future

    async def run(self, future: Future, work: Callable[[], Awaitable[Payload]]) -> None:
        """Run `work` and record its outcome on `future`; never raises (the client polls for failures)."""
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
            raise UserError(
                f"unknown request_id {request_id!r} "
                f"(results are kept {self._fetched_keep_s:.0f} s after they are fetched, "
                f"{self._ttl_s:.0f} s if never fetched)",
                404,
            )
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

    def fetched(self, future: Future) -> None:
        """The client has the result: keep it only `fetched_keep_s` longer, for a poll that is retried."""
        if future.fetched_at is None:
            future.fetched_at = time.monotonic()

    def prune(self) -> None:
        """Forget results fetched more than `fetched_keep_s` ago and unfetched ones older than the TTL."""
        now = time.monotonic()
        expired = [
            key
            for key, f in self._futures.items()
            if (f.fetched_at is not None and now - f.fetched_at > self._fetched_keep_s)
            or (f.finished_at is not None and now - f.finished_at > self._ttl_s)
        ]
        for key in expired:
            del self._futures[key]

    async def close(self, grace_s: float) -> None:
        """Let running work finish for up to `grace_s`, then cancel the rest: none runs half-way at exit."""
        await settle(set(self._tasks), grace_s)


class OrderedQueue:
    """Runs one model's requests one at a time in `seq_id` order, each exactly once.

    The tinker SDK sends a model's requests one after another, each once the previous one was accepted, except
    the chunks of one forward_backward, which it sends in parallel (the first chunk last). So only a request
    submitted with `chunk=True` may arrive before an earlier seq_id. Any other request that skips a seq_id is
    refused at once, and the queue moves past it (a client carrying on after a request the server refused is
    not stuck). A chunk waits for its predecessors; if they do not arrive within `gap_timeout_s`, the waiting
    requests fail with a message naming the missing seq_id, and the queue moves past them. A retried request
    (same seq_id, kind and fingerprint) gets the first request's id back and is never applied again; one that
    differs is refused.
    """

    def __init__(
        self, name: str, futures: FutureStore, *, next_seq: int = 1, gap_timeout_s: float = 30.0
    ) -> None:
        self._name = name
        self._futures = futures
        self._next = next_seq
        self._gap_timeout_s = gap_timeout_s
        self._seen: dict[int, tuple[str, str, str | None]] = {}  # seq_id -> (kind, request_id, fingerprint)
        self._pending: dict[int, tuple[Future, Callable[[], Awaitable[Payload]]]] = {}
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(
        self,
        owner: str,
        seq_id: int | None,
        kind: str,
        work: Callable[[], Awaitable[Payload]],
        *,
        chunk: bool = False,
        fingerprint: str | None = None,
    ) -> str:
        """Queue `work` (a `kind` request) at `seq_id` (None: after all seen so far); return its id."""
        if seq_id is None:
            seq_id = max([self._next - 1, *self._seen]) + 1
        if seq_id in self._seen:
            return self._retry(seq_id, kind, fingerprint)
        if self._stopped:
            raise UserError(
                f"{self._name} no longer takes requests: its session finished or the server is stopping", 410
            )
        if seq_id < self._next:
            raise UserError(
                f"seq_id {seq_id} for {self._name} comes after seq_id {self._next - 1} already ran; "
                f"the next request must use seq_id {self._next} or later"
            )
        missing = next((s for s in range(self._next, seq_id) if s not in self._seen), None)
        if missing is not None and not chunk:
            message = (
                f"seq_id {seq_id} of {self._name} arrived before seq_id {missing}, which can no longer come: "
                "requests to one model carry consecutive seq_ids, and only the chunks of one "
                "forward_backward may arrive out of order. This request is refused; "
                f"the model continues from seq_id {seq_id + 1}"
            )
            # a client that carries on after a refused request is not stuck
            self._skip_to(seq_id + 1, message)
            raise UserError(message)
        future = self._futures.create(owner)
        self._seen[seq_id] = (kind, future.request_id, fingerprint)
        self._pending[seq_id] = (future, work)
        self._arrived.set()
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return future.request_id

    def _retry(self, seq_id: int, kind: str, fingerprint: str | None) -> str:
        seen_kind, request_id, seen_fingerprint = self._seen[seq_id]
        if seen_kind != kind:
            raise UserError(
                f"seq_id {seq_id} of {self._name} was already used by a {seen_kind} request; each request to "
                "a model needs its own seq_id"
            )
        if fingerprint != seen_fingerprint:
            raise UserError(
                f"seq_id {seq_id} of {self._name} was already used by a different {kind} request; "
                "a retry must repeat the request unchanged, and new work needs a new seq_id"
            )
        return request_id

    async def _run(self) -> None:
        while True:
            if self._next in self._pending:
                future, work = self._pending.pop(self._next)
                self._next += 1
                await self._futures.run(future, work)
                self._forget_old()
                continue
            if self._stopped:
                self._fail_pending(f"{self._name} was released before seq_id {self._next} arrived", "User")
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), self._gap_timeout_s if self._pending else None)
            except TimeoutError:
                self._give_up_gap()

    def _forget_old(self) -> None:
        """Bound the retry memory: seq_ids far behind the newest can no longer be retried."""
        if len(self._seen) > 2 * SEEN_KEPT:
            oldest = self._next - SEEN_KEPT
            for seq in [s for s in self._seen if s < oldest]:
                del self._seen[seq]

    def _give_up_gap(self) -> None:
        waiting = sorted(self._pending)
        self._skip_to(
            waiting[-1] + 1,
            f"seq_id {self._next} of {self._name} never arrived (waited {self._gap_timeout_s:.0f} s), so "
            f"seq_id {waiting[0]} cannot run; requests to one model must carry consecutive seq_ids",
        )

    def _skip_to(self, seq_id: int, message: str) -> None:
        """Give up on everything before `seq_id`: the requests waiting there fail with `message`."""
        self._fail_pending(message, "User", below=seq_id)
        self._next = max(self._next, seq_id)
        self._arrived.set()

    def _fail_pending(self, message: str, category: Category, below: float = float("inf")) -> None:
        for seq in sorted(s for s in self._pending if s < below):
            self._pending.pop(seq)[0].finish(error=(message, category))

    def stop(self) -> None:
        """Take no more requests; the runner finishes what can still run in order, then ends."""
        self._stopped = True
        self._arrived.set()

    async def close(self, grace_s: float) -> None:
        """Stop, give queued work up to `grace_s` to finish, then cancel what runs and fail what waits."""
        self.stop()
        if self._runner is not None:
            await settle({self._runner}, grace_s)
        self._fail_pending("the server shut down before this request ran; send it again", "Server")


class BatchQueue(Generic[K, R, T]):
    """Gathers items submitted for the same key within a short window and runs them as one batch.

    `run_batch(key, items)` is synchronous (it runs in a worker thread) and returns one result per item; an
    exception in that list fails only its own item. When the whole batch raises, each item runs again alone,
    so only the request that caused the failure fails, whoever sent the others batched with it.
    """

    def __init__(
        self, run_batch: Callable[[K, list[R]], list[T | BaseException]], *, window_s: float, max_batch: int
    ) -> None:
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
                items = [item for item, _ in live]
                try:
                    results = await asyncio.to_thread(self._run_batch, key, items)
                except Exception as exc:  # noqa: BLE001 - one item's failure must not become the batch's
                    results = [exc] if len(items) == 1 else [await self._alone(key, item) for item in items]
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

    async def _alone(self, key: K, item: R) -> T | BaseException:
        try:
            return (await asyncio.to_thread(self._run_batch, key, [item]))[0]
        except Exception as exc:  # noqa: BLE001 - becomes this item's own failure
            return exc
