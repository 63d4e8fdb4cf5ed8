"""The session actor's mailbox: what may be asked of a session, as plain values.

Every request carries the `ReplyTo` address its one answer goes to (a WebSocket
`ok`/`error`, or a waiting REST caller); notices carry none. Connections are
named by `ConnectionRef`, never by a live object.
"""

from __future__ import annotations

from dataclasses import dataclass

from domain.identity import Identity

from ..ports import ConnectionRef, ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinSession:
    conn: ConnectionRef
    reply: ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaveSession:
    """A connection leaves: by request (`left`), by closing (`closed`) or silently (`dropped`)."""

    conn: ConnectionRef
    reason: str = "left"
    last_alive_ms: int | None = None  # when it was last known alive (frame or pong)
    reply: ReplyTo | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberAlive:
    """A notice from a joined connection: it was known alive at `at_ms` (its last pong). Sent
    to sessions held through the cluster; one in this process reads the instant itself
    (`Delivery.last_alive`) when it checkpoints."""

    conn: ConnectionRef
    at_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MembersLost:
    """Cluster mode: `node`'s lease expired, so its connections are gone. Its members leave
    at the last instant each was reported alive (never later)."""

    node: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RelaySignal:
    conn: ConnectionRef
    to: str
    kind: str
    payload: bytes
    reply: ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class SendChat:
    caller: Identity
    conn_id: str | None  # None: sent over REST (participant, not necessarily joined)
    client_id: str
    body: str
    reply: ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class EditChat:
    caller: Identity
    message_id: str
    body: str
    reply: ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteChat:
    caller: Identity
    message_id: str
    reply: ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class RaiseReceipt:
    conn: ConnectionRef
    kind: str
    seq: int
    reply: ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class SetTyping:
    conn: ConnectionRef
    active: bool
    reply: ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """start / end / cancel, from REST or the `session.end` frame."""

    caller: Identity
    name: str
    reply: ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class GetLiveBilling:
    caller: Identity
    reply: ReplyTo


@dataclass(frozen=True, slots=True, kw_only=True)
class Flush:
    """Answered once everything queued before it is handled and billing is checkpointed."""

    reply: ReplyTo


@dataclass(frozen=True, slots=True)
class BillingDue:
    """Posted by the billing clock when the session's billing deadline passes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointFailed:
    """Posted by the billing clock when a tick checkpoint it wrote for the session failed."""

    error: Exception  # StorageUnavailable, Fenced, another ParleyError


SessionMessage = (
    JoinSession
    | LeaveSession
    | MemberAlive
    | MembersLost
    | RelaySignal
    | SendChat
    | EditChat
    | DeleteChat
    | RaiseReceipt
    | SetTyping
    | Transition
    | GetLiveBilling
    | Flush
    | BillingDue
    | CheckpointFailed
)
