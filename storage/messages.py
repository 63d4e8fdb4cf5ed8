"""Requests the storage actor takes. Writes are group-committed; reads run beside them.

Each request is a small frozen dataclass deriving from `Write[R]` or `Read[R]`,
where `R` is what the backend answers it with (also named in its docstring), so
`await storage.read(GetSession(...))` is typed `SessionRecord`. A refusal is a
`domain.errors` exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from domain.chat import ChatMessage, Marks
from domain.session import SessionRecord
from domain.timeline import TimelineEntry

R = TypeVar("R", covariant=True)


class Write(Generic[R]):
    """A write answered with an `R`; group-committed with its neighbours."""

    __slots__ = ()


class Read(Generic[R]):
    """A read answered with an `R`."""

    __slots__ = ()


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
class CreateSession(Write[tuple[SessionRecord, bool]]):
    """→ (SessionRecord, replayed: bool). A repeated idempotency key returns the first session."""

    session: SessionRecord
    idempotency_key: str | None = None
    timeline: TimelineEntry


@dataclass(frozen=True, slots=True, kw_only=True)
class TransitionSession(Write[SessionRecord]):
    """→ SessionRecord after the change. Conflict if the stored state does not allow it.

    `final_billing`, when given, is written in the same transaction (ending a session).
    """

    session_id: str
    name: str  # start | end | cancel
    at: int
    end_reason: str | None = None
    final_billing: BillingState | None = None
    timeline: tuple[TimelineEntry, ...] = ()
    epoch: int | None = None  # cluster mode: refused (Fenced) unless the session's owner_epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendTimeline(Write[None]):
    """→ None."""

    entries: tuple[TimelineEntry, ...]
    epoch: int | None = None  # cluster mode: refused (Fenced) unless the session's owner_epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointBilling(Write[None]):
    """→ None. Refused silently once the bill is final (a late tick never changes it)."""

    billing: BillingState
    timeline: tuple[TimelineEntry, ...] = ()
    epoch: int | None = None  # cluster mode: refused (Fenced) unless the session's owner_epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class InsertMessage(Write[tuple[ChatMessage, bool]]):
    """→ (ChatMessage, duplicate: bool). A known (session, sender, client_id) returns the original.

    The stored message's `seq` is the session's next one, whatever `message.seq` says.
    """

    message: ChatMessage
    epoch: int | None = None  # cluster mode: refused (Fenced) unless the session's owner_epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class EditMessage(Write[ChatMessage]):
    """→ ChatMessage. NotFound, or Forbidden unless `editor` sent it; Conflict if deleted."""

    session_id: str
    message_id: str
    editor: str
    body: str
    at: int
    epoch: int | None = None  # cluster mode: refused (Fenced) unless the session's owner_epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteMessage(Write[ChatMessage]):
    """→ ChatMessage. NotFound, or Forbidden unless `by` sent it or `as_admin`."""

    session_id: str
    message_id: str
    by: str
    as_admin: bool
    at: int
    epoch: int | None = None  # cluster mode: refused (Fenced) unless the session's owner_epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class RaiseMark(Write[Marks]):
    """→ Marks. Marks only move forward; `read` raises `delivered` too."""

    session_id: str
    user: str
    kind: str  # delivered | read
    seq: int
    epoch: int | None = None  # cluster mode: refused (Fenced) unless the session's owner_epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveIdempotentReply(Write[None]):
    """→ None. Keeps the first reply to (user, route, key)."""

    user: str
    route: str
    key: str
    status: int
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileAfterRestart(Write[tuple[str, ...]]):
    """→ tuple of active session ids. Closes every open billing segment at its last checkpoint."""

    now: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimSession(Write[int]):
    """→ the session's new owner epoch. Cluster mode: `node` now owns it; every write carrying
    an older epoch is refused from here on (Fenced). NotFound for an unknown session."""

    session_id: str
    node: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseSession(Write[None]):
    """→ None. The owner gives the session up (`owner_node` NULL), if `owner_epoch` is still its own."""

    session_id: str
    owner_epoch: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AgreeSetting(Write[str]):
    """→ the value stored under `key`: `value` if none was, else the first one stored (cluster
    settings that must agree across nodes)."""

    key: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeWrite(Write[None]):
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
    | ClaimSession
    | ReleaseSession
    | AgreeSetting
    | ProbeWrite
)

# ---------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True, kw_only=True)
class GetSession(Read[SessionRecord]):
    """→ SessionRecord, or NotFound."""

    session_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListSessions(Read[tuple[tuple[SessionRecord, ...], int | None]]):
    """→ (tuple[SessionRecord, ...], next_cursor | None), newest first."""

    user: str | None  # None: every session (admin)
    state: str | None = None
    cursor: int | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class GetMessages(Read[tuple[ChatMessage, ...]]):
    """→ tuple[ChatMessage, ...] oldest first."""

    session_id: str
    after_seq: int | None = None
    before_seq: int | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class GetMessage(Read[ChatMessage]):
    """→ ChatMessage, or NotFound."""

    session_id: str
    message_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GetChatState(Read[tuple[int, Marks]]):
    """→ (last_seq, Marks of `user`)."""

    session_id: str
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSnapshot:
    """What a session actor starts from: its session, last chat seq, bill and chat marks."""

    session: SessionRecord
    last_seq: int
    billing: BillingState | None  # an active session's (None otherwise: nothing is billing)
    marks: tuple[tuple[str, Marks], ...]  # (user, marks) of every user with a stored mark


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSession(Read[SessionSnapshot]):
    """→ SessionSnapshot, or NotFound: `GetSession`, `GetChatState`, `GetBilling` of an active
    session and every participant's marks, in one round trip."""

    session_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GetBilling(Read[BillingState | None]):
    """→ BillingState | None."""

    session_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GetTimeline(Read[tuple[TimelineEntry, ...]]):
    """→ tuple[TimelineEntry, ...] oldest first."""

    session_id: str
    limit: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class GetIdempotentReply(Read[tuple[int, bytes] | None]):
    """→ (status, body) | None."""

    user: str
    route: str
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListActiveOwners(Read[tuple[tuple[str, str | None], ...]]):
    """→ ((session id, owner node | None), ...) of every active session (the takeover sweep)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeRead(Read[None]):
    """→ None."""


ReadRequest = (
    GetSession
    | ListSessions
    | GetMessages
    | GetMessage
    | GetChatState
    | LoadSession
    | GetBilling
    | GetTimeline
    | GetIdempotentReply
    | ListActiveOwners
    | ProbeRead
)
