"""Wall-clock time derived from Trio's clock.

Actors measure durations with `trio.current_time()` (monotonic, and fake under
`MockClock`). Stored timestamps need wall time, so one `WallClock` maps the
monotonic clock onto epoch milliseconds, read once at start: a step of the
system clock while the process runs changes no duration and no stored instant,
and under a mock clock wall time advances exactly as fast as the fake clock does,
which keeps billing tests deterministic. (Across a restart the system clock may
have been stepped: each session keeps its own instants from going backwards, see
actors/session/actor.py.)
"""

from __future__ import annotations

import time

import trio


class WallClock:
    """Maps `trio.current_time()` to epoch milliseconds. Create it inside `trio.run`."""

    __slots__ = ("_epoch_ms_at_base", "_trio_base")

    def __init__(self, epoch_ms: int | None = None) -> None:
        self._epoch_ms_at_base = int(time.time() * 1000) if epoch_ms is None else epoch_ms
        self._trio_base = trio.current_time()

    def now_ms(self) -> int:
        return self.to_wall_ms(trio.current_time())

    def to_wall_ms(self, trio_time: float) -> int:
        # round, not truncate: float error must not make a due instant look 1 ms early
        return self._epoch_ms_at_base + round((trio_time - self._trio_base) * 1000)
