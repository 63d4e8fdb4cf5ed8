"""Turns at the GIL for the storage threads while the Trio loop is busy.

The storage actor runs the database in worker threads. Each time such a thread comes back
from C (a statement's `sqlite3_step`, a commit's fsync, a psycopg round trip) it must take
the GIL again. CPython hands the GIL over only when its holder releases it and the waiter
wins the race for it, or when the waiter has waited a whole switch interval (5 ms) with no
release at all. A busy Trio loop releases the GIL many times a millisecond (every
`epoll_wait(0)` between batches of tasks, every socket call) and takes it back at once, so
the waiting thread keeps being woken, keeps losing, and never asks for a switch: measured
here, a worker thread got the GIL about 6 times a second beside a loop that never blocks,
and a storage batch (a few takes) took about a second. (A loop that blocks now and then,
as under closed-loop clients, hands the GIL over when it blocks: `bench/README.md`, pass 4.)

`GilTurns` is a Trio instrument that closes that gap: while a storage thread has work
(`running()`) and the loop is about to poll without blocking (it has runnable tasks), it
sleeps `HANDOFF` seconds at most once every `PERIOD`, with the GIL released, so a waiting
thread takes it. That costs the loop at most HANDOFF / PERIOD of its time (2 %), only while
it is saturated and a storage thread is working; a loop that blocks in `epoll_wait` gives
the GIL away by itself and is never delayed. While turns are being given (`contended()`),
the storage actor asks the database driver for as few statements per batch as it can.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio

PERIOD = 0.001  # seconds between two turns, at least
HANDOFF = 0.00002  # seconds the loop sleeps for a turn: covers a waiting thread's wake-up
WINDOW = 0.1  # seconds over which `contended()` counts turns
CONTENDED_TURNS = 20  # turns in a window (at most WINDOW / PERIOD = 100) that mean saturated


class GilTurns(trio.abc.Instrument):
    """Counts the storage threads' jobs in flight and, while there are some, gives them turns.

    Used by one Trio run: `install()` adds it to the running loop and `uninstall()` removes it;
    `running()` wraps each job handed to a worker thread. All three run in the Trio thread."""

    def __init__(self, *, period: float = PERIOD, handoff: float = HANDOFF) -> None:
        self.period = period
        self.handoff = handoff
        self.turns = 0  # turns given so far (for tests and statistics)
        self._jobs = 0
        self._last = 0.0
        self._window_start = 0.0
        self._window_turns = 0
        self._last_window_turns = 0
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            trio.lowlevel.add_instrument(self)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            self._installed = False
            try:
                trio.lowlevel.remove_instrument(self)
            except KeyError:  # already removed by Trio (an instrument that raised is dropped)
                pass

    @contextmanager
    def running(self) -> Iterator[None]:
        self._jobs += 1
        try:
            yield
        finally:
            self._jobs -= 1

    def contended(self) -> bool:
        """The loop has been saturated while the storage threads worked: at least a fifth of the
        turns it could give in a `WINDOW` were given, in this one or the last (a loop with some
        task runnable now and then gives a few; one that never blocks gives one each `PERIOD`)."""
        self._roll(time.perf_counter())
        return max(self._window_turns, self._last_window_turns) >= CONTENDED_TURNS

    def _roll(self, now: float) -> None:
        if now - self._window_start >= WINDOW:
            recent = now - self._window_start < 2 * WINDOW
            self._last_window_turns = self._window_turns if recent else 0
            self._window_turns = 0
            self._window_start = now

    def before_io_wait(self, timeout: float) -> None:
        if timeout or not self._jobs:
            return  # the loop will block (and release the GIL), or no thread is waiting for it
        now = time.perf_counter()
        if now - self._last >= self.period:
            time.sleep(self.handoff)  # releases the GIL; a thread waiting for it takes it
            self._last = time.perf_counter()
            self.turns += 1
            self._roll(now)
            self._window_turns += 1
