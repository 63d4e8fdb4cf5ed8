"""The storage actor: the one owner of the database.

Writes queue on a bounded channel (`WRITE_QUEUE`; a full queue makes writers
wait, under their own deadline: billing and chat are never dropped). One writer
task takes everything queued — up to `max_batch` requests — runs it as one
transaction in a worker thread, commits once, and only then answers every
requester: group commit. Each run of chat inserts in a batch is stored together
(`insert_messages`: one numbering update per session, one executemany). When
anything in the batch is refused (a conflict, a fenced session), the batch is
rolled back and replayed one request at a time, each inside its own savepoint,
so one refused request does not undo its neighbours.

Deadlines: a `write` / `write_many` call is queued with its deadline, and one watcher
task per actor (`_Deadlines`) wakes a caller still waiting past it with `TooSlowError`
(its requests stay queued and are written in their turn, as a cancelled caller's are).
No cancel scope per write; a caller waits only when the queue is full, under a scope of
its own deadline. The actor answers each request in the Trio thread and wakes each
caller once, when the last request of its call is answered.

Reads run on a second connection in their own thread, so they go on while a
long batch is being written (WAL on SQLite, MVCC on PostgreSQL).

While a worker thread has work and the loop is saturated, the loop gives it turns at the
GIL (`gil_turns.py`): without them a busy loop starves the threads, and a write took
seconds. While turns are being given, each statement costs the thread a wait for one, so
chat runs are then sent in as few statements as the driver can (`few_statements`).

The backend (`sqlite_backend.py`, `postgres_backend.py`) raises only domain
errors. When the database fails (locked, read-only, disk full, I/O error, the
server gone) it raises `StorageUnavailable`: the whole batch is rolled back and
each of its requesters gets that error; the connection is reopened for the next
batch or read, so the server recovers by itself once the database is back.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import outcome
import trio

from domain import metrics
from domain.errors import Internal, ParleyError, StorageUnavailable

from . import messages as m
from .gil_turns import GilTurns

log = logging.getLogger("parley.storage")

WRITE_QUEUE = 4096
DEFAULT_TIMEOUT = 30.0

R = TypeVar("R")


class Backend(Protocol):
    """A database, driven synchronously from worker threads, one thread per connection.

    Every method raises only domain errors: `StorageUnavailable` when the database
    failed (the connection is then discarded), another `ParleyError` (`Conflict`,
    `NotFound`, `Internal` for an integrity error, ...) when one request is refused.
    """

    def connect(self, *, writer: bool) -> Any: ...
    def close(self, conn: Any) -> None: ...
    def begin(self, conn: Any) -> None: ...
    def commit(self, conn: Any) -> None: ...
    def rollback(self, conn: Any) -> None: ...
    def savepoint(self, conn: Any) -> None: ...
    def rollback_to(self, conn: Any) -> None: ...
    def release(self, conn: Any) -> None: ...
    def write(self, conn: Any, request: m.WriteRequest) -> Any: ...
    def insert_messages(
        self, conn: Any, requests: Sequence[m.InsertMessage], *, few_statements: bool = False
    ) -> list[Any]:
        """`write` of each, in order; raises a `ParleyError` unless it answered all of them.
        `few_statements`: the loop is saturated, so send the run in as few statements as the
        driver can (each statement costs the thread a wait for the GIL), even if slower alone."""
        ...
    def read(self, conn: Any, request: m.ReadRequest) -> Any: ...


class _Call:
    """One `write` or `write_many` call: how many of its requests are still unanswered, its
    deadline, and the one task waiting for the answers. Lighter than a cancel scope, an Event or
    a memory channel for the hottest path in the server: the storage actor answers requests in
    the Trio thread and wakes the task once, when the last of its call is answered; its one
    deadline watcher (`_Deadlines`) wakes it with `TooSlowError` once the deadline has passed.
    A task that gave up (cancelled from outside, past its deadline) is not woken."""

    __slots__ = ("left", "deadline", "expired", "_task")

    def __init__(self, left: int, deadline: float) -> None:
        self.left = left
        self.deadline = deadline
        self.expired = False
        self._task: trio.lowlevel.Task | None = None

    def answered(self) -> None:
        """One of its requests was answered (called by the storage actor, in queue order)."""
        self.left -= 1
        if not self.left:
            task, self._task = self._task, None
            if task is not None:
                trio.lowlevel.reschedule(task)

    def expire(self) -> None:
        """Its deadline passed (the watcher): the waiting task gets `TooSlowError`."""
        self.expired = True
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Error(trio.TooSlowError()))

    async def wait(self) -> None:
        """Until every request of the call is answered; `TooSlowError` past its deadline."""
        if self.left:
            if self.expired:
                raise trio.TooSlowError
            self._task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _Pending:
    """One queued write, its answer (the value, or an `outcome.Error` when it was refused), and
    the call it belongs to."""

    __slots__ = ("request", "result", "call")

    def __init__(self, request: m.WriteRequest, call: _Call) -> None:
        self.request = request
        self.result: Any = _UNANSWERED
        self.call = call


_UNANSWERED: Any = object()


class _Deadlines:
    """The storage actor's one deadline watcher, instead of a cancel scope per write.

    Calls are kept in the order they were queued (`calls`); the actor answers requests in
    that order too, so answered calls leave from the front (`forget_answered`, once per batch),
    and what is kept is bounded by the write queue and the batch being written. One timer
    (a cancel scope around `sleep_forever`) is set no later than the earliest deadline kept:
    when it fires, every call past its deadline is expired, and the timer is set to the
    earliest deadline left. With nothing kept, the timer is off (no wake-ups when idle)."""

    def __init__(self) -> None:
        self.calls: deque[_Call] = deque()
        self._timer = trio.CancelScope()

    def add(self, call: _Call) -> None:
        self.calls.append(call)
        if call.deadline < self._timer.deadline:
            self._timer.deadline = call.deadline

    def forget_answered(self) -> None:
        calls = self.calls
        while calls and not calls[0].left:
            calls.popleft()
        if not calls:
            self._timer.deadline = math.inf

    async def watch(self) -> None:
        while True:
            with self._timer:
                await trio.sleep_forever()
            now = trio.current_time()
            earliest = math.inf
            for call in self.calls:
                if call.left and not call.expired:
                    if call.deadline <= now:
                        call.expire()
                    elif call.deadline < earliest:
                        earliest = call.deadline
            self._timer = trio.CancelScope(deadline=earliest)

    def fail_all(self) -> None:
        """The actor is gone: nobody waits for an answer that cannot come."""
        for call in self.calls:
            if call.left:
                call.left = 0
                task, call._task = call._task, None
                if task is not None:
                    trio.lowlevel.reschedule(task, outcome.Error(StorageUnavailable("storage is shutting down")))
        self.calls.clear()


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageStatistics:
    batches: int
    writes: int
    largest_batch: int
    failed_batches: int
    healthy: bool
    queued: int


class StorageHandle:
    """What other actors hold: `write`, `read` and readiness. Safe to share between tasks."""

    def __init__(self, actor: StorageActor, requests: trio.MemorySendChannel[_Pending]) -> None:
        self._actor = actor
        self._requests = requests

    async def write(self, request: m.Write[R], *, timeout: float = DEFAULT_TIMEOUT) -> R:
        call = _Call(1, trio.current_time() + timeout)
        pending = _Pending(request, call)  # type: ignore[arg-type]
        await self._queue((pending,), call)
        await call.wait()
        result = pending.result
        if type(result) is outcome.Error:
            result.unwrap()
        if result is _UNANSWERED:
            raise StorageUnavailable("storage is shutting down")
        return result  # type: ignore[no-any-return]

    async def write_many(
        self, requests: Sequence[m.Write[R]], *, timeout: float = DEFAULT_TIMEOUT
    ) -> list[outcome.Outcome[R]]:
        """Queue every request, then wait for all: they share group commits. Answers in order,
        each an Outcome (one refused request does not fail the others)."""
        if not requests:
            return []
        call = _Call(len(requests), trio.current_time() + timeout)
        writes = [_Pending(request, call) for request in requests]  # type: ignore[arg-type]
        await self._queue(writes, call)
        await call.wait()
        results: list[outcome.Outcome[R]] = []
        for pending in writes:
            result = pending.result
            if result is _UNANSWERED:
                raise StorageUnavailable("storage is shutting down")
            results.append(result if type(result) is outcome.Error else outcome.Value(result))
        return results

    async def _queue(self, writes: Sequence[_Pending], call: _Call) -> None:
        """Queue every write of `call` back to back (no checkpoint while the queue has room: one
        batch, not many), then give the call to the deadline watcher. A full queue is waited on
        under the call's deadline."""
        send = self._requests
        try:
            for pending in writes:
                try:
                    send.send_nowait(pending)
                except trio.WouldBlock:
                    with trio.CancelScope(deadline=call.deadline) as waiting:
                        await send.send(pending)
                    if waiting.cancelled_caught:
                        raise trio.TooSlowError from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StorageUnavailable("storage is shutting down") from None
        self._actor.deadlines.add(call)

    async def read(self, request: m.Read[R], *, timeout: float = DEFAULT_TIMEOUT) -> R:
        with trio.fail_after(timeout):
            return await self._actor.read(request)  # type: ignore[arg-type]

    async def check_ready(self, now_ms: int) -> bool:
        """True when a read works and writes commit (probing with a write when unhealthy)."""
        try:
            if not self._actor.healthy:
                await self.write(m.ProbeWrite(at=now_ms), timeout=5)
            await self.read(m.ProbeRead(), timeout=5)
        except (ParleyError, trio.TooSlowError):
            return False
        return self._actor.healthy

    @property
    def healthy(self) -> bool:
        return self._actor.healthy

    def statistics(self) -> StorageStatistics:
        return self._actor.statistics()

    async def aclose(self) -> None:
        """Stop taking writes; the actor commits what is queued, then closes the database."""
        await self._requests.aclose()


class StorageActor:
    def __init__(self, backend: Backend, *, max_batch: int = 256, inline: bool = False) -> None:
        """`inline=True` runs the database in the Trio thread on one connection: for tests under a
        fake clock (a worker thread would let the clock jump while a write is under way)."""
        self.backend = backend
        self.max_batch = max_batch
        self.inline = inline
        self.healthy = True
        self._writer: Any = None
        self._reader: Any = None
        self._closed = False
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._batches = 0
        self._writes = 0
        self._largest_batch = 0
        self._failed_batches = 0
        self._receive: trio.MemoryReceiveChannel[_Pending] | None = None
        self.deadlines = _Deadlines()
        self.gil_turns = GilTurns()  # the worker threads' turns at the GIL while the loop is busy

    def statistics(self) -> StorageStatistics:
        queued = self._receive.statistics().current_buffer_used if self._receive else 0
        return StorageStatistics(
            batches=self._batches,
            writes=self._writes,
            largest_batch=self._largest_batch,
            failed_batches=self._failed_batches,
            healthy=self.healthy,
            queued=queued,
        )

    async def run(self, *, task_status: trio.TaskStatus[StorageHandle] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[_Pending](WRITE_QUEUE)
        self._receive = receive
        if not self.inline:
            self.gil_turns.install()
        try:
            self._writer = await self._in_writer_thread(self.backend.connect, writer=True)
            if self.inline:
                self._reader = self._writer
            else:
                self._reader = await self._in_reader_thread(lambda: self.backend.connect(writer=False))
        except BaseException:
            self.gil_turns.uninstall()
            raise
        task_status.started(StorageHandle(self, send))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.deadlines.watch)
                async with receive:
                    await self._write_loop(receive)
                nursery.cancel_scope.cancel()
        finally:
            self.deadlines.fail_all()
            try:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await self._in_writer_thread(self._close_connections)
            finally:
                self.gil_turns.uninstall()

    async def _in_writer_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.inline:
            await trio.lowlevel.checkpoint()
            return fn(*args, **kwargs)
        with self.gil_turns.running():
            return await trio.to_thread.run_sync(
                lambda: fn(*args, **kwargs), limiter=self._write_limiter, abandon_on_cancel=False
            )

    async def _in_reader_thread(self, fn: Callable[[], Any]) -> Any:
        with self.gil_turns.running():
            return await trio.to_thread.run_sync(fn, limiter=self._read_limiter)

    async def _write_loop(self, receive: trio.MemoryReceiveChannel[_Pending]) -> None:
        async for first in receive:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            results = await self._in_writer_thread(
                self._apply_batch, [p.request for p in batch], self.gil_turns.contended()
            )
            metrics.STORAGE_BATCH.observe(len(batch))
            for pending, result in zip(batch, results):
                pending.result = result
                pending.call.answered()  # wakes its task once its call is answered; not one that gave up
            self.deadlines.forget_answered()

    def _apply_batch(self, requests: list[m.WriteRequest], few_statements: bool = False) -> list[Any]:
        """Runs in the writer thread: one transaction for the whole batch.

        Most batches are refused nothing, so they run without savepoints, their chat inserts
        grouped (`_apply_grouped`). When a request is refused (a conflict, a fenced session,
        or a message the grouped insert cannot answer itself), the transaction is rolled back
        and the batch is run again with a savepoint around each request, so only that one is
        undone.
        """
        backend = self.backend
        try:
            if self._writer is None:
                self._writer = backend.connect(writer=True)
                if self.inline:
                    self._reader = self._writer
            conn = self._writer
            backend.begin(conn)
            try:
                results = self._apply_grouped(conn, requests, few_statements)
            except StorageUnavailable:
                raise
            except ParleyError:
                backend.rollback(conn)
                backend.begin(conn)
                results = self._apply_each(conn, requests)
            backend.commit(conn)
        except StorageUnavailable as exc:
            self._failed_batches += 1
            if self.healthy:
                log.error("storage failed, %d writes refused: %s", len(requests), exc)
            self.healthy = False
            self._discard_writer()
            error = StorageUnavailable(exc.message)  # one fresh error, no worker-thread traceback
            return [outcome.Error(error) for _ in requests]
        if not self.healthy:
            log.warning("storage recovered")
        self.healthy = True
        self._batches += 1
        self._writes += len(requests)
        self._largest_batch = max(self._largest_batch, len(requests))
        return results

    def _apply_grouped(self, conn: Any, requests: list[m.WriteRequest], few_statements: bool) -> list[Any]:
        backend = self.backend
        results: list[Any] = []
        i, n = 0, len(requests)
        while i < n:
            if type(requests[i]) is m.InsertMessage:
                j = i + 1
                while j < n and type(requests[j]) is m.InsertMessage:
                    j += 1
                results.extend(backend.insert_messages(
                    conn, requests[i:j], few_statements=few_statements))  # type: ignore[arg-type]
                i = j
            else:
                results.append(backend.write(conn, requests[i]))
                i += 1
        return results

    def _apply_each(self, conn: Any, requests: list[m.WriteRequest]) -> list[Any]:
        backend = self.backend
        results: list[Any] = []
        for request in requests:
            backend.savepoint(conn)
            try:
                results.append(backend.write(conn, request))
            except StorageUnavailable:
                raise
            except ParleyError as exc:
                backend.rollback_to(conn)
                if isinstance(exc, Internal):
                    log.error("the database refused %r: %s", request, exc.__cause__ or exc)
                results.append(outcome.Error(exc))
            backend.release(conn)
        return results

    def _discard_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is None:
            return
        if self._reader is conn:
            self._reader = None
        try:
            self.backend.rollback(conn)
        except StorageUnavailable:  # the connection is going away; its own error was already reported
            pass
        self._close_quietly(conn)

    def _discard_reader(self) -> None:
        conn, self._reader = self._reader, None
        if conn is self._writer:
            self._writer = None
        if conn is not None:
            self._close_quietly(conn)

    def _close_quietly(self, conn: Any) -> None:
        try:
            self.backend.close(conn)
        except StorageUnavailable:
            pass

    def _close_connections(self) -> None:
        self._closed = True
        if self._reader is self._writer:
            self._reader = None
        self._discard_writer()
        if self._reader is not None:
            self._close_quietly(self._reader)
            self._reader = None

    async def read(self, request: m.ReadRequest) -> Any:
        def run() -> Any:
            if self._closed:
                raise StorageUnavailable("storage is closed")
            if self._reader is None:  # first read after a failure: reconnect
                if self.inline:
                    self._writer = self._reader = self.backend.connect(writer=True)
                else:
                    self._reader = self.backend.connect(writer=False)
            try:
                return self.backend.read(self._reader, request)
            except StorageUnavailable:
                self._discard_reader()
                raise

        if self.inline:
            await trio.lowlevel.checkpoint()
            return run()
        return await self._in_reader_thread(run)
