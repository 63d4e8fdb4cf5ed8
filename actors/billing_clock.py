"""The billing clock: one task per process that wakes session actors when billing is due.

The session actor owns the ledger and decides *when* billing is next due (the next
tick, the one-minute warning, the budget limit); it keeps that one deadline in its
`BillingTimer`, which is only a handle on this clock. The clock keeps every
session's deadline in one timer wheel and, when a deadline passes, posts one
`BillingDue` into that session's mailbox. No task per session: 2,000 billing
sessions cost one sleeping task, one deadline in Trio's deadline heap and 2,000
dict entries, instead of 2,000 tasks re-arming 2,000 cancel scopes every tick.

The wheel: buckets `BUCKET` seconds wide, keyed by `ceil(deadline / BUCKET)`, in a
dict; a heap holds the bucket keys (each key once), so finding the next bucket is
O(1) and scheduling, rescheduling and cancelling are O(1) dict moves (plus a heap
push the first time a bucket is used). A heap of deadlines alone would make every
reschedule an O(log n) push and leave a stale entry behind each time (every tick
of every session reschedules); buckets also batch the wake-ups: every session due
in one bucket is woken in the same pass, so their checkpoints reach storage
together and share one group commit. A wake-up is never early (a deadline is
rounded *up* to its bucket's end) and late by less than one bucket plus the time
the clock task waits for the CPU; within a bucket, sessions are woken in the order
of their deadlines.

Rules, as for the per-session timer this replaces:
- `reschedule` is synchronous and may be called any number of times: the last
  deadline wins (`math.inf`: never), `cancel` is `reschedule(math.inf)`.
- Coalesced: once a wake-up is posted, the timer is disarmed until the session says
  it handled it (`woken()`); a deadline set in between is kept and armed then. So a
  session never has a second wake-up queued behind the first.
- Never blocking, never dropping: the clock posts with `send_nowait`. When the
  session's mailbox is full, the wake-up is not lost, it is retried in the next
  bucket (and the one after, until it fits): a dropped wake-up would stop that
  session's billing pushes and checkpoints for good. `statistics().retried` counts
  those retries.
- A retired session is forgotten: `close()` (the session's `finally`) removes its
  timer from the wheel; a mailbox found closed does the same. The wheel holds no
  entry for a session that is gone.

Tick checkpoints go through the clock too: the session hands its checkpoint over
(`BillingTimer.checkpoint`, sync) and goes on; the clock's writer sends everything
handed over since its last write as one `write_many`, so the sessions woken in one
bucket land in one group commit, and no session task waits on storage for a tick.
At most one checkpoint per session waits in the clock: a newer one replaces it (each
is the whole bill, and tick checkpoints carry no timeline). A write that succeeded
is not reported; one that failed is posted back to its session (`failed(error)`,
the session's `CheckpointFailed`), which tries again `STORAGE_RETRY` later or, when
fenced, gives the session up. Like wake-ups, a failure report finding the mailbox
full is retried in the next bucket, never dropped. A session writing its bill
itself (a presence change, Flush) first takes back what still waits in the clock
(`discard_checkpoint`), so an older checkpoint never lands after a newer one;
what the writer has already queued in storage lands first (storage is FIFO).

The clock runs in the process's supervision tree beside the session actors (it is
stopped with them, before storage closes); without a running clock, timers still
take deadlines but nothing wakes their sessions.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import outcome
import trio

from domain.errors import StorageUnavailable
from storage.actor import DEFAULT_TIMEOUT, StorageHandle

log = logging.getLogger("parley.billing")

M = TypeVar("M")

BUCKET = 0.020  # seconds: the wheel's resolution (wake-ups are late by less than this)


@dataclass(frozen=True, slots=True, kw_only=True)
class BillingClockStatistics:
    timers: int  # open timers (live sessions)
    armed: int  # timers with a deadline in the wheel
    buckets: int  # non-empty buckets
    posted: int  # wake-ups posted since start
    retried: int  # wake-ups put off to the next bucket because a mailbox was full
    forgotten: int  # timers dropped because their session's mailbox had closed
    checkpoints: int  # tick checkpoints written
    checkpoint_writes: int  # write_many calls that carried them (checkpoints / writes = batch)
    checkpoints_failed: int


class BillingTimer(Generic[M]):
    """One session's deadline on the clock; made by `BillingClock.timer`.

    Only the session's own task calls its methods; they never block.
    """

    __slots__ = ("_clock", "_mailbox", "_wake", "_failed", "_deadline", "_bucket", "_pending", "_closed")

    def __init__(
        self, clock: BillingClock, mailbox: trio.MemorySendChannel[M], wake: M, failed: Callable[[Exception], M]
    ) -> None:
        self._clock = clock
        self._mailbox = mailbox
        self._wake = wake
        self._failed = failed
        self._deadline = math.inf
        self._bucket: int | None = None  # the wheel's key holding this timer, if armed
        self._pending = False  # a wake-up is in the mailbox, not handled yet
        self._closed = False

    @property
    def deadline(self) -> float:
        """The last deadline asked for (math.inf: none)."""
        return self._deadline

    @property
    def pending(self) -> bool:
        return self._pending

    def reschedule(self, deadline: float) -> None:
        """Wake the session at Trio time `deadline` (math.inf: never). The last call wins."""
        self._deadline = deadline
        if not self._pending and not self._closed:
            self._clock._arm(self)

    def cancel(self) -> None:
        self.reschedule(math.inf)

    def woken(self) -> None:
        """The session took its wake-up from the mailbox: the next deadline may be armed."""
        self._pending = False
        if not self._closed:
            self._clock._arm(self)

    def checkpoint(self, request: Any) -> None:
        """Hand a tick checkpoint (a `CheckpointBilling` without timeline, already stamped
        for the session's storage) to the clock's writer; a failure comes back as a message."""
        self._clock._checkpoint(self, request)

    def discard_checkpoint(self) -> None:
        """Take back a checkpoint still waiting in the clock (the session writes a newer one)."""
        self._clock._waiting.pop(self, None)

    def close(self) -> None:
        """The session retires: forget its deadline (idempotent). A checkpoint it handed
        over is still written, its result no longer reported."""
        if not self._closed:
            self._closed = True
            self._clock._forget(self)


class BillingClock:
    """Owns the timer wheel; `run` is its one task."""

    def __init__(
        self, storage: StorageHandle | None = None, *, bucket: float = BUCKET, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if not bucket > 0:
            raise ValueError("bucket must be positive")
        self._storage = storage
        self._write_timeout = timeout
        self._width = bucket
        self._buckets: dict[int, dict[BillingTimer, None]] = {}  # key -> timers (insertion-ordered set)
        self._keys: list[int] = []  # heap of the keys in `_buckets` (each once)
        self._queued: set[int] = set()  # keys currently in the heap
        self._sleep: trio.CancelScope | None = None  # the run loop's wait, while it waits
        self._timers = 0
        self._posted = 0
        self._retried = 0
        self._forgotten = 0
        self._waiting: dict[BillingTimer, Any] = {}  # checkpoints handed over, not yet sent
        self._handed = trio.Event()
        self._failures: dict[BillingTimer, Exception] = {}  # failed checkpoints not yet reported
        self._checkpoints = 0
        self._checkpoint_writes = 0
        self._checkpoints_failed = 0

    def timer(
        self, mailbox: trio.MemorySendChannel[M], wake: M, failed: Callable[[Exception], M] | None = None
    ) -> BillingTimer[M]:
        """A timer that posts `wake` into `mailbox` when due, and `failed(error)` when a checkpoint
        it handed over failed (without `failed`: `wake` again); the clock closes `mailbox` when
        the timer is closed."""
        self._timers += 1
        return BillingTimer(self, mailbox, wake, failed or (lambda error: wake))

    def statistics(self) -> BillingClockStatistics:
        return BillingClockStatistics(
            timers=self._timers, armed=sum(len(b) for b in self._buckets.values()), buckets=len(self._buckets),
            posted=self._posted, retried=self._retried, forgotten=self._forgotten,
            checkpoints=self._checkpoints, checkpoint_writes=self._checkpoint_writes,
            checkpoints_failed=self._checkpoints_failed,
        )

    async def run(self, *, task_status: trio.TaskStatus[BillingClock] = trio.TASK_STATUS_IGNORED) -> None:
        """The wheel and, beside it, the checkpoint writer; until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            task_status.started(self)
            try:
                while True:
                    with trio.CancelScope(deadline=self._next_at()) as self._sleep:
                        await trio.sleep_forever()
                    self._sleep = None
                    now = trio.current_time()
                    self._fire(now)
                    self._report(now)
            finally:
                self._sleep = None

    # ------------------------------------------------------------ checkpoints

    def _checkpoint(self, timer: BillingTimer, request: Any) -> None:
        if self._storage is None:
            raise RuntimeError("this billing clock has no storage to write checkpoints to")
        self._waiting.pop(timer, None)  # a newer one replaces it (and goes to the end)
        self._waiting[timer] = request
        self._handed.set()

    async def _write_loop(self) -> None:
        assert self._storage is not None or not self._waiting
        while True:
            await self._handed.wait()
            self._handed = trio.Event()
            batch, self._waiting = self._waiting, {}
            if not batch:
                continue
            assert self._storage is not None
            requests = list(batch.values())
            try:
                results: list[outcome.Outcome] = await self._storage.write_many(
                    requests, timeout=self._write_timeout
                )
            except (StorageUnavailable, trio.TooSlowError) as exc:
                error = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable("storage did not answer")
                results = [outcome.Error(error)] * len(requests)
            self._checkpoints += len(requests)
            self._checkpoint_writes += 1
            for timer, result in zip(batch, results):
                if isinstance(result, outcome.Error):
                    self._checkpoints_failed += 1
                    if not timer._closed:
                        self._failures[timer] = result.error  # type: ignore[assignment]
            if self._failures:
                self._report(trio.current_time())

    def _report(self, now: float) -> None:
        """Post failed checkpoints back to their sessions; a full mailbox: the next bucket."""
        for timer, error in list(self._failures.items()):
            if timer._closed:
                del self._failures[timer]
                continue
            try:
                timer._mailbox.send_nowait(timer._failed(error))
            except trio.WouldBlock:
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            del self._failures[timer]
        if self._failures and self._sleep is not None:
            at = (self._key(now) + 1) * self._width
            if at < self._sleep.deadline:
                self._sleep.deadline = at

    # ------------------------------------------------------------ the wheel

    def _key(self, deadline: float) -> int:
        return math.ceil(deadline / self._width)

    def _next_at(self) -> float:
        while self._keys and self._keys[0] not in self._buckets:
            self._queued.discard(heapq.heappop(self._keys))  # emptied by reschedules
        at = self._keys[0] * self._width if self._keys else math.inf
        if self._failures:  # reports that found a full mailbox: try again next bucket
            at = min(at, (self._key(trio.current_time()) + 1) * self._width)
        return at

    def _arm(self, timer: BillingTimer) -> None:
        self._place(timer, self._key(timer._deadline) if timer._deadline != math.inf else None)

    def _place(self, timer: BillingTimer, key: int | None) -> None:
        if key == timer._bucket:
            return
        self._unlink(timer)
        if key is None:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            if key not in self._queued:
                self._queued.add(key)
                heapq.heappush(self._keys, key)
        bucket[timer] = None
        timer._bucket = key
        at = key * self._width
        if self._sleep is not None and at < self._sleep.deadline:
            self._sleep.deadline = at  # an earlier bucket than the one the loop sleeps for

    def _unlink(self, timer: BillingTimer) -> None:
        key, timer._bucket = timer._bucket, None
        if key is not None:
            bucket = self._buckets[key]
            del bucket[timer]
            if not bucket:
                del self._buckets[key]  # its heap key is skipped when it comes up

    def _forget(self, timer: BillingTimer) -> None:
        self._unlink(timer)
        self._timers -= 1
        timer._mailbox.close()

    def _fire(self, now: float) -> None:
        """Post a wake-up to every timer whose bucket has come (no await: one pass)."""
        retry: list[BillingTimer] = []
        while self._keys and self._keys[0] * self._width <= now:
            key = heapq.heappop(self._keys)
            self._queued.discard(key)
            bucket = self._buckets.pop(key, None)
            if not bucket:
                continue
            due = list(bucket)
            if len(due) > 1:
                due.sort(key=lambda t: t._deadline)
            for timer in due:
                timer._bucket = None
                try:
                    timer._mailbox.send_nowait(timer._wake)
                except trio.WouldBlock:
                    retry.append(timer)  # the mailbox is full: next bucket, never dropped
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    timer._closed = True  # the session has retired
                    self._forgotten += 1
                    self._timers -= 1
                    timer._mailbox.close()
                else:
                    timer._pending = True
                    self._posted += 1
        if retry:
            self._retried += len(retry)
            later = self._key(now) + 1  # strictly after now: not again in this pass
            for timer in retry:
                self._place(timer, later)  # its deadline stays what the session asked for
