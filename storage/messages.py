"""Requests the storage actor takes. Writes are group-committed; reads run beside them.

Each request is a small frozen dataclass; the backend answers it with the value
named in its docstring or raises a `domain.errors` exception.
"""

from __future__ import annotations

from dataclasses import dataclass

from domain.chat import ChatMessage
from domain.session import SessionRecord
from domain.timeline import TimelineEntry

# ---------------------------------------------------------------- billing state


@dataclass(frozen=True, slots=True, kw_only=True)
class BillingState:
    """What storage keeps of a session's bill. Segments are closed `[start, end)` epoch ms."""

    session_id: str
    rate_per_minute: int
    currency: str
    segments: tuple[tuple[int, int], ...] = ()
    open: bool = False  # a segment was running at checkpoint time
    checkpoint_at: int | None = None
    final: bool = False

    @property
    def billable_ms(self) -> int:
        return sum(end - start for start, end in self.segments)


# ---------------------------------------------------------------- writes


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateSession:
    """→ (SessionRecord, replayed: bool). A repeated idempotency key returns the first session."""

    session: SessionRecord
    idempotency_key: str | None = None
    timeline: TimelineEntry


@dataclass(frozen=True, slots=True, kw_only=True)
class TransitionSession:
    """→ SessionRecord after the change. Conflict if the stored state does not allow it.

    `final_billing`, when given, is written in the same transaction (ending a session).
    """

    session_id: str
    name: str  # start | end | cancel
    at: int
    end_reason: str | None = None
    final_billing: BillingState | None = None
    timeline: tuple[TimelineEntry, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendTimeline:
    """→ None."""

    entries: tuple[TimelineEntry, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointBilling:
    """→ None. Refused silently once the bill is final (a late tick never changes it)."""

    billing: BillingState
    timeline: tuple[TimelineEntry, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class InsertMessage:
    """→ (ChatMessage, duplicate: bool). A known (session, sender, client_id) returns the original.

    The stored message's `seq` is the session's next one, whatever `message.seq` says.
    """

    message: ChatMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class EditMessage:
    """→ ChatMessage. NotFound, or Forbidden unless `editor` sent it; Conflict if deleted."""

    session_id: str
    message_id: str
    editor: str
    body: str
    at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteMessage:
    """→ ChatMessage. NotFound, or Forbidden unless `by` sent it or `as_admin`."""

    session_id: str
    message_id: str
    by: str
    as_admin: bool
    at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RaiseMark:
    """→ Marks. Marks only move forward; `read` raises `delivered` too."""

    session_id: str
    user: str
    kind: str  # delivered | read
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveIdempotentReply:
    """→ None. Keeps the first reply to (user, route, key)."""

    user: str
    route: str
    key: str
    status: int
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileAfterRestart:
    """→ tuple of active session ids. Closes every open billing segment at its last checkpoint."""

    now: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeWrite:
    """→ None. A harmless write, for readiness checks."""

    at: int


WriteRequest = (
    CreateSession
    | TransitionSession
    | AppendTimeline
    | CheckpointBilling
    | InsertMessage
    | EditMessage
    | DeleteMessage
    | RaiseMark
    | SaveIdempotentReply
    | ReconcileAfterRestart
    | ProbeWrite
)

# ---------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True, kw_only=True)
class GetSession:
    """→ SessionRecord, or NotFound."""

    session_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListSessions:
    """→ (tuple[SessionRecord, ...], next_cursor | None), newest first."""

    user: str | None  # None: every session (admin)
    state: str | None = None
    cursor: int | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class GetMessages:
    """→ tuple[ChatMessage, ...] oldest first."""

    session_id: str
    after_seq: int | None = None
    before_seq: int | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class GetMessage:
    """→ ChatMessage, or NotFound."""

    session_id: str
    message_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GetChatState:
    """→ (last_seq, Marks of `user`)."""

    session_id: str
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GetBilling:
    """→ BillingState | None."""

    session_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GetTimeline:
    """→ tuple[TimelineEntry, ...] oldest first."""

    session_id: str
    limit: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class GetIdempotentReply:
    """→ (status, body) | None."""

    user: str
    route: str
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeRead:
    """→ None."""


ReadRequest = (
    GetSession
    | ListSessions
    | GetMessages
    | GetMessage
    | GetChatState
    | GetBilling
    | GetTimeline
    | GetIdempotentReply
    | ProbeRead
)
