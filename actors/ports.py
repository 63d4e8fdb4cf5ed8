"""The seams between actors: plain values, and the two ports that carry them.

Nothing here is a live object of another actor. A session knows a connection by
its `ConnectionRef` (a value that could name a connection on another node) and
answers a request at its `ReplyTo` address (a value too). What a session does to
a connection goes through `Delivery`; how a connection or the REST app finds a
session goes through `SessionDirectory` (actors/directory.py). The in-process
implementations are `PostOffice` (actors/post_office.py) and the supervisor; a
cluster puts remote implementations behind the same two ports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from domain.errors import ParleyError
from domain.identity import Identity
from protocol.replies import Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRef:
    """Who a connection is, as a value: its id, its user, and the node holding it."""

    id: str
    user: str
    is_admin: bool = False
    node: str | None = None  # None: this process

    @property
    def identity(self) -> Identity:
        return Identity(user=self.user, is_admin=self.is_admin)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToConnection:
    """Answer with an `ok`/`error` frame on that connection (no `ok` without a `ref`)."""

    conn: ConnectionRef
    ref: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ToCaller:
    """Answer a caller waiting for call `call_id` (the REST path)."""

    call_id: int
    node: str | None = None


ReplyTo = ToConnection | ToCaller


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatFrame:
    """A `chat.message` frame with the `seq` the receiving connection orders it by.
    `text` is None for the sender's own message: its client has it, nothing is sent,
    but the connection counts it as seen."""

    session_id: str
    seq: int
    text: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatCursor:
    """Sent right after a join's `ok`: the client has seen everything up to `after_seq`;
    the connection owes it every message up to `last_seq` (the offline queue), then live ones."""

    session_id: str
    after_seq: int
    last_seq: int


Outgoing = str | ChatFrame | ChatCursor


class Delivery(Protocol):
    """What a session may do to connections and callers. Never blocks.

    A connection whose outbox is full is a slow consumer: the delivery closes it
    (1008) instead of waiting or buffering. Nothing is lost by that: chat is
    durable and comes back by `seq` when the client rejoins; signaling is redone.
    """

    def deliver(self, conn: ConnectionRef, item: Outgoing) -> None: ...

    def reply(self, to: ReplyTo, result: Reply | ParleyError) -> None: ...

    def last_alive(self, conn: ConnectionRef) -> int | None:
        """The connection's last frame or pong (wall ms), read from the connection itself when
        it is in this process; None when this delivery cannot see it (it closed, or it is on
        another node: then its `MemberAlive` notices are what the session knows)."""
        ...
