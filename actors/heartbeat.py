"""One heartbeat wheel per process: liveness for every connection, without a task each.

PRODUCT.md section 4: the server pings every `heartbeat` seconds; a connection that
does not answer within two intervals is closed (4008) and leaves every session at the
last instant it was known alive, its last frame or pong.

Each connection owns that instant (`last_alive`: its reader sets it on every frame,
its socket on every pong) and registers with the wheel while it runs. The wheel owns
only when it looks at each connection next, in buckets of `interval / SLOTS` seconds,
and one task walks the buckets as they come due. A visit to a connection:
- silent for two intervals: it times out (`heartbeat_timeout`: close 4008, dropped,
  so it leaves at `last_alive`);
- otherwise it reports `last_alive` to the sessions that cannot read it (held through
  the cluster) if that moved since its last report (a connection with traffic is
  reported without a ping, and those sessions hear at least once an interval, which
  cluster members rely on; a session in this process reads it when it checkpoints);
- silent for one interval and not pinged since: it is pinged. `ping()` never waits
  (the socket writes the frame at once if it can, else leaves it to the task writing
  or to a flush task of its own), so one slow socket never holds up the wheel;
- then it goes into the bucket of its next due instant: `last_alive` plus one interval
  (ping due) or two (time-out due). Frames move `last_alive` without touching the wheel;
  a visit that comes early just re-files the connection.

So an idle connection costs one visit and one ping per interval, and a chatty one one
visit per interval and no ping. The wheel is also the registry of running connections
that a graceful shutdown walks (`shut_down`: each closes 1001).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import trio

log = logging.getLogger("parley.heartbeat")

SLOTS = 16  # buckets per interval: a time-out is noticed at most interval/SLOTS late


class Beating(Protocol):
    """What the wheel needs of a connection (actors/connection.py `Connection`)."""

    last_alive: float  # Trio time of its last frame or pong; the connection owns it

    def ping(self) -> None:
        """Send a WebSocket ping without waiting."""

    def report_alive(self) -> None:
        """Tell the joined sessions that cannot read it (cluster) `last_alive`, if it moved."""

    def heartbeat_timeout(self) -> None:
        """Silent for two intervals: close 4008, leaving at `last_alive`."""

    def going_away(self) -> None:
        """The server shuts down: close 1001."""


class Beat:
    """The wheel's entry for one connection: `conn` is None once it unregistered."""

    __slots__ = ("conn", "pinged_at")

    def __init__(self, conn: Beating) -> None:
        self.conn: Beating | None = conn
        self.pinged_at = -math.inf


class HeartbeatWheel:
    def __init__(self, interval: float, *, slots: int = SLOTS) -> None:
        self.interval = interval
        self._step = interval / slots
        self._buckets: dict[int, list[Beat]] = {}
        self._beats: set[Beat] = set()  # every registered connection
        self._cursor = math.floor(trio.current_time() / self._step)  # last bucket walked
        self._work = trio.Event()  # set while anyone is registered: the wheel sleeps otherwise

    def __len__(self) -> int:
        return len(self._beats)

    def register(self, conn: Beating) -> Beat:
        beat = Beat(conn)
        self._beats.add(beat)
        self._file(beat, conn.last_alive + self.interval)
        self._work.set()
        return beat

    def unregister(self, beat: Beat) -> None:
        beat.conn = None  # its bucket drops it when walked
        self._beats.discard(beat)

    def shut_down(self) -> None:
        """Graceful shutdown: every running connection closes 1001 (sync: none is missed)."""
        for beat in list(self._beats):
            if beat.conn is not None:
                beat.conn.going_away()

    def _file(self, beat: Beat, due: float) -> None:
        index = max(math.ceil(due / self._step), self._cursor + 1)
        bucket = self._buckets.get(index)
        if bucket is None:
            self._buckets[index] = [beat]
        else:
            bucket.append(beat)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._beats:
                self._work = trio.Event()
                await self._work.wait()
                self._cursor = max(self._cursor, math.floor(trio.current_time() / self._step))
            await trio.sleep_until((self._cursor + 1) * self._step)
            now = trio.current_time()
            last = math.floor(now / self._step)
            while self._cursor < last:
                self._cursor += 1
                bucket = self._buckets.pop(self._cursor, None)
                if bucket:
                    self._visit(bucket, now)

    def _visit(self, bucket: list[Beat], now: float) -> None:
        interval = self.interval
        for beat in bucket:
            conn = beat.conn
            if conn is None:
                continue
            try:
                last_alive = conn.last_alive
                silent = now - last_alive
                if silent >= 2 * interval:
                    self.unregister(beat)
                    conn.heartbeat_timeout()
                    continue
                conn.report_alive()
                if silent >= interval:
                    if beat.pinged_at <= last_alive:  # one ping per silence (a pong may share its instant)
                        beat.pinged_at = now
                        conn.ping()
                    self._file(beat, last_alive + 2 * interval)
                else:
                    self._file(beat, last_alive + interval)
            except Exception:  # one connection's bug must not stop everyone's heartbeat
                log.exception("heartbeat of %r failed; closing it", conn)
                self.unregister(beat)
                conn.heartbeat_timeout()
