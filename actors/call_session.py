"""The session actor: one per live session.

It owns the session's membership (one live connection per user), routes
signaling between joined participants, orders chat (it hands out `seq`), runs
the lifecycle transitions and the billing ledger, and ends an active session
nobody has been connected to for `orphan_timeout`.

It is alive while the session is active or anybody is joined; everything it
knows beyond that is in storage, so a later join or REST call starts it again.

Mailbox: bounded (`MAILBOX_SIZE`). Connections and the REST app *await* space in
it (TCP pushes back on a flooding client); the actor itself never waits on a
connection: frames go out with `send_nowait`, and a connection whose outbox is
full is closed as a slow consumer (its chat comes back from storage when it
rejoins). It does wait on storage, under the storage handle's deadline.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import outcome
import trio

from domain import metrics, timeline
from domain.billing import Ledger, amount_minor
from domain.chat import MAX_HISTORY_LIMIT, ChatMessage
from domain.clock import WallClock, iso
from domain.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Internal,
    NotFound,
    NotJoined,
    ParleyError,
    StorageUnavailable,
)
from domain.identity import Identity
from domain.session import (
    ACTIVE,
    CANCELLED,
    END_ENDED,
    END_LIMIT_REACHED,
    END_ORPHANED,
    SessionRecord,
    check_transition,
)
from domain.settings import Settings
from protocol import wire
from storage import messages as sm

from .billing_timer import BillingDue, BillingTimer

if TYPE_CHECKING:
    from storage.actor import StorageHandle

    from .connection import ConnectionHandle

log = logging.getLogger("parley.session")

MAILBOX_SIZE = 256
BACKLOG_PAGE = MAX_HISTORY_LIMIT
BACKLOG_SEND_TIMEOUT = 30.0  # a catching-up client that reads nothing for this long is slow
CHAT_BATCH = 64  # chat sends stored in one round trip
STORAGE_RETRY = 1.0  # seconds before a failed billing or orphan write is tried again
TYPING_BURST = 4  # typing:true forwards a user may make at once; then one per second


# ---------------------------------------------------------------- replies


class Replier(Protocol):
    """Where the answer to one request goes: a WebSocket `ok`/`error`, or a REST caller."""

    def ok(self, **fields: Any) -> None: ...
    def fail(self, error: ParleyError) -> None: ...


@dataclass(frozen=True, slots=True)
class FrameReply:
    conn: ConnectionHandle
    ref: str | None

    def ok(self, **fields: Any) -> None:
        if self.ref is not None:
            self.conn.send_nowait(wire.ok(self.ref, **fields))

    def fail(self, error: ParleyError) -> None:
        metrics.ERRORS.labels(error.code).inc()
        self.conn.send_nowait(wire.error(self.ref, error.code, error.message, **error.extra))


@dataclass(frozen=True, slots=True)
class ChannelReply:
    channel: trio.MemorySendChannel[outcome.Outcome]

    def ok(self, **fields: Any) -> None:
        self._put(outcome.Value(fields))

    def fail(self, error: ParleyError) -> None:
        self._put(outcome.Error(error))

    def _put(self, result: outcome.Outcome) -> None:
        try:
            self.channel.send_nowait(result)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the caller gave up waiting


# ---------------------------------------------------------------- mailbox messages


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinSession:
    conn: ConnectionHandle
    reply: Replier


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaveSession:
    """A connection leaves: by request (`left`), by closing (`closed`) or silently (`dropped`)."""

    conn_id: str
    user: str
    reason: str = "left"
    last_alive_ms: int | None = None  # when it was last known alive (frame or pong)
    reply: Replier | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RelaySignal:
    conn: ConnectionHandle
    to: str
    kind: str
    payload: bytes
    reply: Replier


@dataclass(frozen=True, slots=True, kw_only=True)
class SendChat:
    caller: Identity
    conn_id: str | None  # None: sent over REST (participant, not necessarily joined)
    client_id: str
    body: str
    reply: Replier


@dataclass(frozen=True, slots=True, kw_only=True)
class EditChat:
    caller: Identity
    message_id: str
    body: str
    reply: Replier


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteChat:
    caller: Identity
    message_id: str
    reply: Replier


@dataclass(frozen=True, slots=True, kw_only=True)
class RaiseReceipt:
    conn: ConnectionHandle
    kind: str
    seq: int
    reply: Replier


@dataclass(frozen=True, slots=True, kw_only=True)
class SetTyping:
    conn: ConnectionHandle
    active: bool
    reply: Replier


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """start / end / cancel, from REST or the `session.end` frame."""

    caller: Identity
    name: str
    reply: Replier


@dataclass(frozen=True, slots=True, kw_only=True)
class GetLiveBilling:
    caller: Identity
    reply: Replier


@dataclass(frozen=True, slots=True, kw_only=True)
class BacklogDone:
    """A backlog pump sent everything up to `upto_seq` to `member`."""

    member: Member
    upto_seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Flush:
    """Answered once everything queued before it is handled and billing is checkpointed."""

    reply: Replier


SessionMessage = (
    JoinSession
    | LeaveSession
    | RelaySignal
    | SendChat
    | EditChat
    | DeleteChat
    | RaiseReceipt
    | SetTyping
    | Transition
    | GetLiveBilling
    | BacklogDone
    | BillingDue
    | Flush
)


# ---------------------------------------------------------------- handle


class SessionGone(Exception):
    """The session actor has retired; ask the supervisor for a fresh handle."""


class SessionHandle:
    """The session's id and mailbox. `retired` flips once the actor stops taking messages."""

    def __init__(self, session_id: str, mailbox: trio.MemorySendChannel[SessionMessage]) -> None:
        self.session_id = session_id
        self._mailbox = mailbox
        self.retired = False

    async def send(self, message: SessionMessage) -> None:
        try:
            await self._mailbox.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SessionGone(self.session_id) from None

    async def call(self, make: Any, *, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send `make(reply=..., **fields)` and wait for its answer (the REST path)."""
        send, receive = trio.open_memory_channel[outcome.Outcome](1)
        with trio.fail_after(timeout):
            await self.send(make(reply=ChannelReply(send), **fields))
            result = await receive.receive()
        return result.unwrap()


# ---------------------------------------------------------------- the actor


@dataclass(eq=False, slots=True)
class Member:
    conn: ConnectionHandle
    catching_up: bool = False
    typing_until: float | None = None  # Trio time the server turns typing off
    typing_tokens: float = TYPING_BURST
    typing_tokens_at: float = -math.inf
    typing_shown: bool = False  # what the others were last told

    @property
    def user(self) -> str:
        return self.conn.user


@dataclass(eq=False)
class CallSession:
    session_id: str
    storage: StorageHandle
    settings: Settings
    clock: WallClock
    mailbox: trio.MemoryReceiveChannel[SessionMessage]
    handle: SessionHandle
    session: SessionRecord | None = None
    members: dict[str, Member] = field(default_factory=dict)
    last_seq: int = 0
    ledger: Ledger | None = None
    billing_final: bool = False
    orphan_since: float | None = None  # Trio time since nobody is joined (active sessions)
    next_tick_ms: int | None = None
    _timer: BillingTimer | None = None
    _deferred: SessionMessage | None = None
    _nursery: trio.Nursery | None = None

    # ------------------------------------------------------------ lifetime

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._timer = BillingTimer(self.handle._mailbox.clone())
            nursery.start_soon(self._timer.run)
            task_status.started()
            try:
                await self._load()
            except (NotFound, StorageUnavailable, trio.TooSlowError) as exc:
                error = exc if isinstance(exc, ParleyError) else StorageUnavailable("storage did not answer")
                await self._refuse_queued(error)
                nursery.cancel_scope.cancel()
                return
            metrics.SESSIONS.inc()
            try:
                await self._serve()
            finally:
                metrics.SESSIONS.dec()
                if self.ledger is not None and self.ledger.is_open:
                    metrics.BILLING_ACTIVE.dec()
            nursery.cancel_scope.cancel()

    async def _load(self) -> None:
        self.session = await self.storage.read(sm.GetSession(session_id=self.session_id))
        self.last_seq, _ = await self.storage.read(sm.GetChatState(session_id=self.session_id, user=""))
        if self.session.state == ACTIVE:
            state = await self.storage.read(sm.GetBilling(session_id=self.session_id))
            self.ledger = Ledger(
                rate_per_minute=self.session.rate_per_minute,
                max_amount_minor=self.session.max_amount_minor,
                segments=list(state.segments) if state else [],
            )
            self.orphan_since = trio.current_time()

    def refuse_queued_nowait(self, error: ParleyError) -> None:
        """After a crash: answer what is still queued, so no caller waits for nothing."""
        while True:
            try:
                message = self.mailbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            reply = getattr(message, "reply", None)
            if reply is not None:
                reply.fail(error)

    async def _refuse_queued(self, error: ParleyError) -> None:
        """Answer everything queued with `error`, then close the mailbox (no await in between)."""
        while True:
            try:
                message = self.mailbox.receive_nowait()
            except trio.WouldBlock:
                self._retire_mailbox()
                return
            reply = getattr(message, "reply", None)
            if reply is not None:
                reply.fail(error)

    def _retire_mailbox(self) -> None:
        self.handle.retired = True
        self.mailbox.close()

    async def _serve(self) -> None:
        while True:
            deadline = self._next_deadline()
            if deadline == math.inf:  # the common case: no timer to arm
                await self._dispatch_in_order(await self.mailbox.receive())
            else:
                with trio.move_on_at(deadline) as scope:
                    message = await self.mailbox.receive()
                if scope.cancelled_caught:
                    await self._on_deadline()
                else:
                    await self._dispatch_in_order(message)
            if self._idle():
                # drain what is already queued, then close the mailbox with no await
                # in between, so no message can slip in after the last look
                while self._idle():
                    try:
                        message = self.mailbox.receive_nowait()
                    except trio.WouldBlock:
                        self._retire_mailbox()
                        return
                    await self._dispatch_in_order(message)

    def _idle(self) -> bool:
        assert self.session is not None
        return not self.members and self.session.state != ACTIVE

    def _next_deadline(self) -> float:
        deadline = math.inf
        if self.orphan_since is not None and not self.members:
            deadline = self.orphan_since + self.settings.orphan_timeout
        for member in self.members.values():
            if member.typing_until is not None:
                deadline = min(deadline, member.typing_until)
        return deadline

    async def _on_deadline(self) -> None:
        now = trio.current_time()
        for member in list(self.members.values()):
            if member.typing_until is not None and member.typing_until <= now:
                member.typing_until = None
                self._show_typing(member, False, now)
        if (
            self.orphan_since is not None
            and not self.members
            and now >= self.orphan_since + self.settings.orphan_timeout
        ):
            log.info("session %s: nobody connected for %ss, ending", self.session_id, self.settings.orphan_timeout)
            try:
                await self._end(actor="server", reason=END_ORPHANED, at_ms=self.clock.now_ms())
            except (StorageUnavailable, trio.TooSlowError) as exc:
                log.error("session %s: ending the orphan failed, retrying: %s", self.session_id, exc)
                self.orphan_since = now - self.settings.orphan_timeout + STORAGE_RETRY

    async def _dispatch_in_order(self, message: SessionMessage) -> None:
        await self._dispatch(message)
        while self._deferred is not None:  # taken out of the mailbox behind a chat batch
            message, self._deferred = self._deferred, None
            await self._dispatch(message)

    async def _dispatch(self, message: SessionMessage) -> None:
        reply = getattr(message, "reply", None)
        try:
            match message:
                case JoinSession():
                    await self._join(message)
                case LeaveSession():
                    await self._leave(message)
                case RelaySignal():
                    self._signal(message)
                case SendChat():
                    await self._send_chats(self._take_chat_batch(message))
                case EditChat() | DeleteChat():
                    await self._change_chat(message)
                case RaiseReceipt():
                    await self._receipt(message)
                case SetTyping():
                    self._typing(message)
                case Transition():
                    await self._transition(message)
                case GetLiveBilling():
                    self._live_billing(message)
                case BacklogDone():
                    self._backlog_done(message)
                case BillingDue():
                    await self._billing_due()
                case Flush(reply=flush_reply):
                    if self.ledger is not None and self.ledger.is_open and not self.billing_final:
                        await self.storage.write(sm.CheckpointBilling(billing=self._billing_state(self.clock.now_ms())))
                    flush_reply.ok()
                case _:
                    log.warning("session %s: dropped unknown message %r", self.session_id, message)
        except ParleyError as exc:
            if reply is not None:
                reply.fail(exc)
            elif isinstance(exc, StorageUnavailable):
                log.error("session %s: %s", self.session_id, exc)
            else:
                raise
        except trio.TooSlowError:
            if reply is not None:
                reply.fail(StorageUnavailable("storage did not answer in time"))
            else:
                log.error("session %s: storage did not answer in time", self.session_id)
        except Exception:
            # the actor is crashing: the request it was serving gets its one reply first
            # (a chat batch has answered each of its messages already)
            if reply is not None and not isinstance(message, SendChat):
                reply.fail(Internal("the session failed; try again"))
            raise

    # ------------------------------------------------------------ membership

    def _caller_may_see(self, user: str, is_admin: bool) -> None:
        assert self.session is not None
        if not (is_admin or self.session.is_participant(user)):
            raise Forbidden("not a participant of this session")

    def _member_of(self, conn: ConnectionHandle) -> Member:
        member = self.members.get(conn.user)
        if member is None or member.conn.id != conn.id:
            raise NotJoined("join the session first")
        return member

    async def _join(self, message: JoinSession) -> None:
        session = self.session
        assert session is not None
        conn = message.conn
        self._caller_may_see(conn.user, conn.is_admin)
        if not session.joinable:
            raise Conflict(f"the session is {session.state}", state=session.state)
        previous = self.members.get(conn.user)
        if previous is not None and previous.conn.id == conn.id:
            message.reply.ok(**self._join_fields())
            return
        _, marks = await self.storage.read(sm.GetChatState(session_id=self.session_id, user=conn.user))
        now_ms = self.clock.now_ms()
        entries = [timeline.TimelineEntry(
            session_id=self.session_id, at=now_ms, kind=timeline.JOINED, actor=conn.user,
            detail={"connection": conn.id},
        )]
        if previous is not None:
            entries.insert(0, timeline.TimelineEntry(
                session_id=self.session_id, at=now_ms, kind=timeline.REPLACED, actor=conn.user,
                detail={"connection": previous.conn.id, "by": conn.id},
            ))
        await self.storage.write(sm.AppendTimeline(entries=tuple(entries)))
        if previous is not None:
            previous.conn.send_nowait(wire.event("replaced", session=self.session_id))
        member = Member(conn=conn, catching_up=marks.delivered_seq < self.last_seq)
        self.members[conn.user] = member
        self.orphan_since = None
        message.reply.ok(**self._join_fields())
        if member.catching_up:
            assert self._nursery is not None
            self._nursery.start_soon(self._pump_backlog, member, marks.delivered_seq)
        self._broadcast(
            wire.event("presence", session=self.session_id, user=conn.user, state="joined"),
            exclude=conn.user,
        )
        was_billing = self.ledger is not None and self.ledger.is_open
        await self._record_presence(now_ms)
        if was_billing and conn.user in (session.payer, session.provider):
            conn.send_nowait(self._billing_frame(now_ms))  # the meter where it stands

    def _join_fields(self) -> dict[str, Any]:
        assert self.session is not None
        return {
            "session": wire.record(self.session),
            "participants": sorted(self.members),
            "last_seq": self.last_seq,
        }

    async def _leave(self, message: LeaveSession) -> None:
        member = self.members.get(message.user)
        if member is None or member.conn.id != message.conn_id:
            if message.reply is not None:
                raise NotJoined("not joined to this session")
            return
        del self.members[message.user]
        now_ms = self.clock.now_ms()
        at_ms = now_ms if message.last_alive_ms is None else min(now_ms, message.last_alive_ms)
        if not self.members and self.session is not None and self.session.state == ACTIVE:
            self.orphan_since = trio.current_time()
        if member.typing_shown:
            self._broadcast(wire.event("typing", session=self.session_id, user=message.user, active=False))
        self._broadcast(wire.event("presence", session=self.session_id, user=message.user, state="left"))
        kind = timeline.DROPPED if message.reason == "dropped" else timeline.LEFT
        detail: dict[str, Any] = {"connection": message.conn_id, "reason": message.reason}
        if message.last_alive_ms is not None:
            detail["last_alive"] = iso(message.last_alive_ms)
        if message.reply is not None:
            message.reply.ok(session=self.session_id)
        await self._record_presence(at_ms, extra=(timeline.TimelineEntry(
            session_id=self.session_id, at=now_ms, kind=kind, actor=message.user, detail=detail,
        ),))

    async def _record_presence(self, at_ms: int, **kwargs: Any) -> None:
        """Timeline and billing checkpoint of a join or leave that was already answered `ok`:
        a storage failure here is logged, not answered a second time with the same ref."""
        try:
            await self._update_billing(at_ms, **kwargs)
        except (StorageUnavailable, trio.TooSlowError) as exc:
            log.error("session %s: presence change not recorded: %s", self.session_id, exc)

    def _broadcast(self, frame: str, *, exclude: str | None = None, users: tuple[str, ...] | None = None) -> None:
        for user, member in self.members.items():
            if user == exclude or (users is not None and user not in users):
                continue
            member.conn.send_nowait(frame)

    # ------------------------------------------------------------ signaling

    def _signal(self, message: RelaySignal) -> None:
        self._member_of(message.conn)
        target = self.members.get(message.to)
        if target is None:
            raise NotJoined(f"{message.to} is not joined to this session")
        target.conn.send_nowait(wire.encode({
            "type": "signal",
            "session": self.session_id,
            "from": message.conn.user,
            "kind": message.kind,
            "payload": orjson.Fragment(message.payload),
        }))
        message.reply.ok()

    # ------------------------------------------------------------ chat

    def _take_chat_batch(self, first: SendChat) -> list[SendChat]:
        """`first` and the chat sends queued right behind it, so one storage round trip (one
        group commit) serves them all. The first other message stops the batch and is kept
        in `_deferred`, to be handled next: the mailbox order is never changed."""
        batch = [first]
        while len(batch) < CHAT_BATCH and self._deferred is None:
            try:
                message = self.mailbox.receive_nowait()
            except trio.WouldBlock:
                break
            if isinstance(message, SendChat):
                batch.append(message)
            else:
                self._deferred = message
        return batch

    def _chat_candidate(self, message: SendChat) -> ChatMessage:
        session = self.session
        assert session is not None
        caller = message.caller
        if message.conn_id is not None:
            member = self.members.get(caller.user)
            if member is None or member.conn.id != message.conn_id:
                raise NotJoined("join the session first")
        elif not session.is_participant(caller.user):
            raise Forbidden("only participants may write to this session's chat")
        if session.state not in (ACTIVE, "scheduled"):
            raise Conflict(f"the session is {session.state}", state=session.state)
        return ChatMessage(
            id=uuid.uuid4().hex,
            session_id=self.session_id,
            seq=self.last_seq + 1,  # a hint: the database hands out the real one
            client_id=message.client_id,
            sender=caller.user,
            body=message.body,
            created_at=self.clock.now_ms(),
        )

    async def _send_chats(self, batch: list[SendChat]) -> None:
        """Store a batch of messages in one round trip, then ack and deliver each in seq order."""
        accepted: list[tuple[SendChat, ChatMessage]] = []
        for message in batch:
            try:
                accepted.append((message, self._chat_candidate(message)))
            except ParleyError as exc:
                message.reply.fail(exc)
        if not accepted:
            return
        try:
            results = await self.storage.write_many([sm.InsertMessage(message=c) for _, c in accepted])
        except (ParleyError, trio.TooSlowError) as exc:
            error = exc if isinstance(exc, ParleyError) else StorageUnavailable("storage did not answer in time")
            for message, _ in accepted:
                message.reply.fail(error)
            return
        except BaseException:
            for message, _ in accepted:  # the actor is going down: nobody waits for nothing
                message.reply.fail(Internal("the session failed; try again"))
            raise
        for (message, _), result in zip(accepted, results):
            try:
                stored, duplicate = result.unwrap()
            except ParleyError as exc:
                message.reply.fail(exc)
                continue
            self._chat_stored(message, stored, duplicate)

    def _chat_stored(self, message: SendChat, stored: ChatMessage, duplicate: bool) -> None:
        caller = message.caller
        if not duplicate:
            self.last_seq = max(self.last_seq, stored.seq)
            metrics.CHAT_MESSAGES.inc()
        message.reply.ok(
            id=stored.id, seq=stored.seq, created_at=iso(stored.created_at),
            message={**wire.record(stored), "session": self.session_id}, duplicate=duplicate,
        )
        if duplicate:
            return
        frame = wire.encode({"type": "chat.message", "session": self.session_id, **wire.record(stored)})
        for user, member in self.members.items():
            if user != caller.user and not member.catching_up:
                member.conn.send_nowait(frame)
        sender = self.members.get(caller.user)
        if sender is not None and message.conn_id is None and not sender.catching_up:
            sender.conn.send_nowait(frame)  # posted over REST: the sender's socket sees it too
        if sender is not None:
            sender.typing_until = None
            self._show_typing(sender, False, trio.current_time())

    async def _change_chat(self, message: EditChat | DeleteChat) -> None:
        caller = message.caller
        self._caller_may_see(caller.user, caller.is_admin)
        now_ms = self.clock.now_ms()
        if isinstance(message, EditChat):
            changed = await self.storage.write(sm.EditMessage(
                session_id=self.session_id, message_id=message.message_id, editor=caller.user,
                body=message.body, at=now_ms,
            ))
            kind = "chat.updated"
        else:
            changed = await self.storage.write(sm.DeleteMessage(
                session_id=self.session_id, message_id=message.message_id, by=caller.user,
                as_admin=caller.is_admin, at=now_ms,
            ))
            kind = "chat.deleted"
        fields = wire.record(changed)
        message.reply.ok(message={**fields, "session": self.session_id}, **fields)
        self._broadcast(wire.encode({"type": kind, "session": self.session_id, **fields}))

    async def _receipt(self, message: RaiseReceipt) -> None:
        self._member_of(message.conn)
        if message.seq > self.last_seq:
            raise BadRequest(f"seq {message.seq} is beyond the last message ({self.last_seq})")
        marks = await self.storage.write(sm.RaiseMark(
            session_id=self.session_id, user=message.conn.user, kind=message.kind, seq=message.seq,
        ))
        mark = marks.read_seq if message.kind == "read" else marks.delivered_seq
        message.reply.ok(delivered_seq=marks.delivered_seq, read_seq=marks.read_seq)
        if mark == message.seq:  # a stale receipt (below the mark) tells nobody anything new
            self._broadcast(
                wire.event("receipt", session=self.session_id, user=message.conn.user, kind=message.kind, seq=mark),
                exclude=message.conn.user,
            )

    def _typing(self, message: SetTyping) -> None:
        """Others hear of changes only (a refresh just keeps typing alive for `typing_timeout`),
        and a user toggling on and off gets `TYPING_BURST` forwards, then one a second."""
        member = self._member_of(message.conn)
        now = trio.current_time()
        message.reply.ok()
        if message.active:
            member.typing_until = now + self.settings.typing_timeout
            self._show_typing(member, True, now)
        else:
            member.typing_until = None
            self._show_typing(member, False, now)

    def _show_typing(self, member: Member, active: bool, now: float) -> None:
        if member.typing_shown == active:
            return
        if active:
            elapsed = max(0.0, now - member.typing_tokens_at)
            member.typing_tokens = min(TYPING_BURST, member.typing_tokens + elapsed)
            member.typing_tokens_at = now
            if member.typing_tokens < 1:
                return  # shown by a later refresh, once a token is back
            member.typing_tokens -= 1
        member.typing_shown = active
        self._broadcast(
            wire.event("typing", session=self.session_id, user=member.user, active=active),
            exclude=member.user,
        )

    # ------------------------------------------------------------ offline queue

    async def _pump_backlog(self, member: Member, after_seq: int) -> None:
        """Send `member` every stored message above `after_seq`, page by page, awaiting its outbox."""
        try:
            while True:
                page = await self.storage.read(sm.GetMessages(
                    session_id=self.session_id, after_seq=after_seq, limit=BACKLOG_PAGE,
                ))
                for stored in page:
                    frame = wire.encode({"type": "chat.message", "session": self.session_id, **wire.record(stored)})
                    if not await member.conn.send(frame, timeout=BACKLOG_SEND_TIMEOUT):
                        return  # the connection is gone or too slow: it rejoins and resumes
                    after_seq = stored.seq
                if len(page) < BACKLOG_PAGE:
                    break
            await self.handle.send(BacklogDone(member=member, upto_seq=after_seq))
        except (ParleyError, trio.TooSlowError, SessionGone) as exc:
            log.warning("session %s: backlog for %s stopped: %s", self.session_id, member.user, exc)
            member.conn.close_slow_consumer()

    def _backlog_done(self, message: BacklogDone) -> None:
        member = message.member
        if self.members.get(member.user) is not member:
            return
        if message.upto_seq >= self.last_seq:
            member.catching_up = False
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._pump_backlog, member, message.upto_seq)

    # ------------------------------------------------------------ lifecycle

    async def _transition(self, message: Transition) -> None:
        caller = message.caller
        self._caller_may_see(caller.user, caller.is_admin)
        session = self.session
        assert session is not None
        now_ms = self.clock.now_ms()
        if message.name == "end":
            await self._end(actor=caller.user, reason=END_ENDED, at_ms=now_ms, reply=message.reply)
            return
        check_transition(session, message.name)
        kind = timeline.STARTED if message.name == "start" else timeline.CANCELLED
        changed = await self.storage.write(sm.TransitionSession(
            session_id=self.session_id, name=message.name, at=now_ms,
            timeline=(timeline.TimelineEntry(session_id=self.session_id, at=now_ms, kind=kind, actor=caller.user),),
        ))
        self.session = changed
        message.reply.ok(session=wire.record(changed))
        self._broadcast(wire.event("session", session=wire.record(changed)))
        if changed.state == ACTIVE:
            self.ledger = Ledger(rate_per_minute=changed.rate_per_minute, max_amount_minor=changed.max_amount_minor)
            if not self.members:
                self.orphan_since = trio.current_time()
            await self._update_billing(now_ms)
        elif changed.state == CANCELLED:
            self._dismiss_members()

    async def _end(self, *, actor: str, reason: str, at_ms: int, reply: Replier | None = None) -> None:
        session = self.session
        assert session is not None
        if session.state != ACTIVE:
            raise Conflict(f"cannot end a session that is {session.state}", state=session.state)
        ledger = self.ledger or Ledger(rate_per_minute=session.rate_per_minute)
        was_open = ledger.is_open
        # the open segment is cut at `at_ms` in the snapshot; the ledger itself changes only
        # once the end is stored, so a failed write leaves the call billing as before
        final = self._billing_state(at_ms, final=True)
        entries = [timeline.TimelineEntry(
            session_id=self.session_id, at=at_ms, kind=timeline.ENDED, actor=actor, detail={"reason": reason},
        )]
        if was_open:
            entries.insert(0, timeline.TimelineEntry(
                session_id=self.session_id, at=at_ms, kind=timeline.BILLING_STOPPED, actor=actor,
                detail={"reason": reason},
            ))
        entries.append(timeline.TimelineEntry(
            session_id=self.session_id, at=at_ms, kind=timeline.BILLING_FINALIZED, actor="server",
            detail={
                "billable_ms": final.billable_ms,
                "amount_minor": amount_minor(final.billable_ms, session.rate_per_minute),
                "currency": session.currency,
            },
        ))
        changed = await self.storage.write(sm.TransitionSession(
            session_id=self.session_id, name="end", at=at_ms, end_reason=reason,
            final_billing=final, timeline=tuple(entries),
        ))
        # persisted: from here on the session is ended, whatever happens next
        ledger.close(at_ms)
        self.ledger = ledger
        if was_open:
            metrics.BILLING_ACTIVE.dec()
        self.session = changed
        self.billing_final = True
        self.orphan_since = None
        assert self._timer is not None
        self._timer.cancel()
        if reply is not None:
            reply.ok(session=wire.record(changed))
        self._broadcast(wire.event("session", session=wire.record(changed)))
        self._broadcast(self._billing_frame(at_ms, final=True), users=(session.payer, session.provider))
        self._dismiss_members()

    def _dismiss_members(self) -> None:
        # their connections find out on their next request (not_joined)
        self.members.clear()

    # ------------------------------------------------------------ billing

    def _both_present(self) -> bool:
        session = self.session
        assert session is not None
        return session.state == ACTIVE and session.payer in self.members and session.provider in self.members

    async def _update_billing(self, at_ms: int, *, extra: tuple[timeline.TimelineEntry, ...] = ()) -> None:
        """Open or close the billable segment after a presence or state change; checkpoint it."""
        ledger = self.ledger
        entries = list(extra)
        if ledger is not None and not self.billing_final:
            if self._both_present() and not ledger.is_open:
                ledger.open(at_ms)
                metrics.BILLING_ACTIVE.inc()
                entries.append(timeline.TimelineEntry(
                    session_id=self.session_id, at=at_ms, kind=timeline.BILLING_STARTED, actor="server",
                ))
                self.next_tick_ms = at_ms + int(self.settings.billing_tick * 1000)
                self._push_billing(at_ms)
            elif not self._both_present() and ledger.is_open:
                ledger.close(at_ms)
                metrics.BILLING_ACTIVE.dec()
                entries.append(timeline.TimelineEntry(
                    session_id=self.session_id, at=at_ms, kind=timeline.BILLING_STOPPED, actor="server",
                    detail={"billable_ms": ledger.closed_ms},
                ))
                self.next_tick_ms = None
                self._push_billing(at_ms)
            else:
                ledger = None
        else:
            ledger = None
        if ledger is not None:
            self._reschedule_billing()  # from the ledger in memory, even if the write fails
            await self.storage.write(sm.CheckpointBilling(
                billing=self._billing_state(self.clock.now_ms()), timeline=tuple(entries),
            ))
        elif entries:
            await self.storage.write(sm.AppendTimeline(entries=tuple(entries)))

    def _billing_state(self, now_ms: int, *, final: bool = False) -> sm.BillingState:
        session = self.session
        assert session is not None
        ledger = self.ledger or Ledger(rate_per_minute=session.rate_per_minute)
        return sm.BillingState(
            session_id=self.session_id,
            rate_per_minute=session.rate_per_minute,
            currency=session.currency,
            segments=tuple(ledger.snapshot_segments(now_ms)),
            open=ledger.is_open and not final,
            checkpoint_at=now_ms,
            final=final,
        )

    def _billing_frame(self, now_ms: int, *, final: bool = False, **extra: Any) -> str:
        session = self.session
        assert session is not None
        ledger = self.ledger or Ledger(rate_per_minute=session.rate_per_minute)
        billable = ledger.billable_ms(now_ms)
        return wire.event(
            "billing", session=self.session_id, billable_ms=billable,
            amount_minor=amount_minor(billable, session.rate_per_minute),
            currency=session.currency, final=final, **extra,
        )

    def _push_billing(self, now_ms: int, **extra: Any) -> None:
        session = self.session
        assert session is not None
        self._broadcast(self._billing_frame(now_ms, **extra), users=(session.payer, session.provider))

    def _reschedule_billing(self, *, not_before: float = -math.inf) -> None:
        ledger, timer = self.ledger, self._timer
        assert timer is not None
        if ledger is None or not ledger.is_open or self.billing_final:
            timer.cancel()
            return
        due = [t for t in (self.next_tick_ms, ledger.warning_at(), ledger.limit_at()) if t is not None]
        wall_due = min(due)
        timer.reschedule(max(not_before, trio.current_time() + max(0, wall_due - self.clock.now_ms()) / 1000))

    async def _billing_due(self) -> None:
        try:
            await self._billing_due_now()
        except (StorageUnavailable, trio.TooSlowError) as exc:
            # the ledger in memory is right; try the write again soon, not in a busy loop
            log.error("session %s: billing checkpoint failed, retrying: %s", self.session_id, exc)
            self._reschedule_billing(not_before=trio.current_time() + STORAGE_RETRY)
            return
        self._reschedule_billing()

    async def _billing_due_now(self) -> None:
        ledger = self.ledger
        if ledger is None or not ledger.is_open or self.billing_final:
            return
        now_ms = self.clock.now_ms()
        limit_at = ledger.limit_at()
        if limit_at is not None and now_ms >= limit_at:
            await self._end(actor="server", reason=END_LIMIT_REACHED, at_ms=limit_at)
            return
        warning_at = ledger.warning_at()
        if warning_at is not None and now_ms >= warning_at:
            ledger.warned = True
            self._push_billing(now_ms, warning="limit_near")
            await self.storage.write(sm.AppendTimeline(entries=(timeline.TimelineEntry(
                session_id=self.session_id, at=now_ms, kind=timeline.BILLING_LIMIT_NEAR, actor="server",
                detail={"billable_ms": ledger.billable_ms(now_ms)},
            ),)))
        if self.next_tick_ms is not None and now_ms >= self.next_tick_ms:
            tick_ms = int(self.settings.billing_tick * 1000)
            while self.next_tick_ms <= now_ms:
                self.next_tick_ms += tick_ms
            self._push_billing(now_ms)
            await self.storage.write(sm.CheckpointBilling(billing=self._billing_state(now_ms)))

    def _live_billing(self, message: GetLiveBilling) -> None:
        caller = message.caller
        self._caller_may_see(caller.user, caller.is_admin)
        now_ms = self.clock.now_ms()
        state = self._billing_state(now_ms, final=self.billing_final)
        message.reply.ok(billing=state)


async def run_session(
    session_id: str,
    *,
    storage: StorageHandle,
    settings: Settings,
    clock: WallClock,
    task_status: trio.TaskStatus[CallSession] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one session actor; `task_status.started` hands back the actor (its `handle` is public)."""
    send, receive = trio.open_memory_channel[SessionMessage](MAILBOX_SIZE)
    actor = CallSession(
        session_id=session_id, storage=storage, settings=settings, clock=clock,
        mailbox=receive, handle=SessionHandle(session_id, send),
    )
    task_status.started(actor)
    await actor.run()


