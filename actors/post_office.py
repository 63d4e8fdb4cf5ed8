"""The in-process `Delivery`: connection ids to outboxes, call ids to waiting callers.

This is the runtime's table of addresses, like a process table: connection actors
open and close their own box (synchronously, at start and end), callers open a
one-shot slot for the duration of one call, and session actors only ever address
them by value (`ConnectionRef`, `ToCaller`). Every operation is synchronous and
never waits, so no task can hold it up.

It also counts open connections per user (PRODUCT.md section 8): opening a box
is where a connection is admitted, so the limit is checked there, without an
await (nothing can time out between the check and the count).
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import outcome
import trio

from domain import metrics
from domain.errors import ParleyError
from protocol import replies, wire
from protocol.replies import Reply

from .ports import ConnectionRef, Outgoing, ReplyTo, ToCaller, ToConnection

log = logging.getLogger("parley.delivery")


@dataclass(frozen=True, slots=True)
class _Box:
    outbox: trio.MemorySendChannel[Outgoing] | None
    on_overrun: Callable[[], None]  # the connection's own way to close itself (1008)
    # a connection that keeps its own outbox (actors/connection.py): it takes every item,
    # sync (written at once or queued); False when its outbox is full (then `on_overrun`)
    take: Callable[[Outgoing], bool] | None = None
    # the connection's last frame or pong in wall ms (its sessions read it for checkpoints)
    alive: Callable[[], int] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PostOfficeStatistics:
    connections: dict[str, int]  # open connections per user
    pending_calls: int


class PostOffice:
    def __init__(self, *, max_connections_per_user: int) -> None:
        self._max_per_user = max_connections_per_user
        self._boxes: dict[str, _Box] = {}
        self._per_user: collections.Counter[str] = collections.Counter()
        self._calls: dict[int, trio.MemorySendChannel[outcome.Outcome]] = {}
        self._call_ids = itertools.count(1)

    # ------------------------------------------------------------ connections

    def open_box(
        self, conn: ConnectionRef, outbox: trio.MemorySendChannel[Outgoing] | None = None, *,
        on_overrun: Callable[[], None], take: Callable[[Outgoing], bool] | None = None,
        alive: Callable[[], int] | None = None,
    ) -> bool:
        """Admit a connection (False: its user has too many open) and route to its outbox: a
        bounded channel, or the connection's own `take` (exactly one of the two)."""
        if (outbox is None) == (take is None):
            raise TypeError("open_box needs an outbox channel or a take callable")
        if self._per_user[conn.user] >= self._max_per_user:
            return False
        self._per_user[conn.user] += 1
        self._boxes[conn.id] = _Box(outbox, on_overrun, take, alive)
        return True

    def close_box(self, conn: ConnectionRef) -> None:
        if self._boxes.pop(conn.id, None) is None:
            return
        self._per_user[conn.user] -= 1
        if self._per_user[conn.user] <= 0:
            del self._per_user[conn.user]

    def is_open(self, conn_id: str) -> bool:
        """The connection is still here (cluster mode: only live connections are joined again)."""
        return conn_id in self._boxes

    def last_alive(self, conn: ConnectionRef) -> int | None:
        box = self._boxes.get(conn.id)
        return None if box is None or box.alive is None else box.alive()

    def deliver(self, conn: ConnectionRef, item: Outgoing) -> None:
        box = self._boxes.get(conn.id)
        if box is None:
            return  # it closed: it leaves its sessions, which stop addressing it
        if box.take is not None:
            if not box.take(item):
                box.on_overrun()
            return
        assert box.outbox is not None
        try:
            box.outbox.send_nowait(item)
        except trio.WouldBlock:
            box.on_overrun()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # ------------------------------------------------------------ replies

    def reply(self, to: ReplyTo, result: Reply | ParleyError) -> None:
        match to:
            case ToConnection(conn=conn, ref=ref):
                if isinstance(result, ParleyError):
                    metrics.ERRORS.labels(result.code).inc()
                    self.deliver(conn, wire.error(ref, result.code, result.message, **result.extra))
                elif ref is not None:
                    self.deliver(conn, replies.ok_frame(ref, result))
            case ToCaller(call_id=call_id):
                waiting = self._calls.pop(call_id, None)
                if waiting is not None:  # else the caller gave up, or it was answered already
                    answer = outcome.Error(result) if isinstance(result, ParleyError) else outcome.Value(result)
                    waiting.send_nowait(answer)

    @contextmanager
    def call(self) -> Iterator[tuple[ToCaller, trio.MemoryReceiveChannel[outcome.Outcome]]]:
        """A reply address for one call and where its one answer arrives."""
        send, receive = trio.open_memory_channel[outcome.Outcome](1)
        call_id = next(self._call_ids)
        self._calls[call_id] = send
        try:
            yield ToCaller(call_id=call_id), receive
        finally:
            self._calls.pop(call_id, None)

    def statistics(self) -> PostOfficeStatistics:
        return PostOfficeStatistics(connections=dict(self._per_user), pending_calls=len(self._calls))
