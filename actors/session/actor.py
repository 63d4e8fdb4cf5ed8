"""The session actor: one per live session; its loop, its handle, its lifetime.

It owns the session's membership (one live connection per user), routes
signaling between joined participants, orders chat, runs the lifecycle
transitions and the billing ledger, and ends an active session nobody has been
connected to for `orphan_timeout`. The handlers live beside this module, one
per concern (presence, chat, lifecycle, billing); this module is the loop that
takes one message at a time and hands it to them, so all of the session's state
is only ever touched by this one task.

It is alive while the session is active or anybody is joined; everything it
knows beyond that is in storage, so a later join or REST call starts it again.

Mailbox: bounded (`MAILBOX_SIZE`). Connections and the REST app *await* space in
it (TCP pushes back on a flooding client); notices are sent without waiting:
a full mailbox drops a `MemberAlive` (cluster only: in one process the actor reads
its members' last-alive instants through `Delivery.last_alive`), which only makes
billing more conservative, while the process's billing clock
(actors/billing_clock.py) retries a billing wake-up or a failed-checkpoint report
in its next bucket, never dropping one. Tick checkpoints are handed to that clock,
which writes those of every session due together in one group commit; the actor
does not wait for them. The actor itself never waits on a connection: everything
it sends goes through the `Delivery` port, which never blocks. It does wait on
storage, under the storage handle's deadline.

Time: every instant this session stores comes from `now_ms()`, the process's
wall clock plus an offset fixed when the actor loads. The offset is what keeps
the session's instants from going backwards when the system clock was stepped
back while the server was down; durations always come from Trio's monotonic clock.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import trio

from domain import audit, metrics
from domain.billing import Ledger
from domain.chat import Marks
from domain.errors import Fenced, Forbidden, Internal, NotFound, ParleyError, StorageUnavailable
from domain.identity import Identity
from domain.session import ACTIVE, CANCELLED, ENDED, SessionRecord
from domain.settings import Settings
from protocol import wire
from protocol.replies import Done, Reply
from storage import messages as sm
from storage.actor import StorageHandle

from ..billing_clock import BillingClock, BillingTimer
from ..clock import WallClock
from ..ports import ConnectionRef, Delivery, Outgoing, ReplyTo
from . import billing, chat, lifecycle, presence
from .fencing import Ownership, SessionStorage
from .messages import (
    BillingDue,
    CheckpointFailed,
    DeleteChat,
    EditChat,
    Flush,
    GetLiveBilling,
    JoinSession,
    LeaveSession,
    MemberAlive,
    MembersLost,
    RaiseReceipt,
    RelaySignal,
    SendChat,
    SessionMessage,
    SetTyping,
    Transition,
)
from .presence import Member

log = logging.getLogger("parley.session")

MAILBOX_SIZE = 256
IDLE_GRACE = 5.0  # an actor started for a request that never came retires after this long
CHAT_BATCH = 64  # chat sends stored in one round trip


def _checkpoint_failed(error: Exception) -> SessionMessage:
    return CheckpointFailed(error=error)


class SessionGone(Exception):
    """The session actor has retired; look the session up again."""


class SessionHandle:
    """The session's id and mailbox: what a directory lookup hands out.

    `routes` is the session's routing snapshot: joined user → its connection, or None
    when there is none to trust (the actor is not serving, or the session is on another
    node). Only the session actor sets it, and only ever to a new mapping that nobody
    mutates afterwards; connections read it to relay `signal` frames without a hop
    through the session (the session still decides every join and leave).
    """

    __slots__ = ("session_id", "_mailbox", "routes")

    # the actor runs in this process: it reads its members' last-alive instants from their
    # connections (`Delivery.last_alive`), so connections send it no `MemberAlive`
    reads_liveness: ClassVar[bool] = True

    def __init__(self, session_id: str, mailbox: trio.MemorySendChannel[SessionMessage]) -> None:
        self.session_id = session_id
        self._mailbox = mailbox
        self.routes: Mapping[str, ConnectionRef] | None = None

    @property
    def retired(self) -> bool:
        """True once the actor closed its mailbox: the actor alone decides that."""
        return self._mailbox.statistics().open_receive_channels == 0

    async def send(self, message: SessionMessage) -> None:
        try:
            await self._mailbox.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SessionGone(self.session_id) from None

    def send_nowait(self, message: SessionMessage) -> bool:
        """For notices: False when the mailbox is full or closed (the notice is dropped)."""
        try:
            self._mailbox.send_nowait(message)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def timer_mailbox(self) -> trio.MemorySendChannel[SessionMessage]:
        return self._mailbox.clone()


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionContext:
    """What every session actor needs from the process."""

    storage: StorageHandle
    settings: Settings
    clock: WallClock
    delivery: Delivery
    ownership: Ownership | None = None  # cluster mode: claim before loading, fence every write
    billing_clock: BillingClock | None = None  # the process's one billing clock (the supervisor runs it)


class SessionCrashed(Exception):
    """A session actor failed; `active` says whether its session was active (restart it)."""

    def __init__(self, session_id: str, *, active: bool) -> None:
        super().__init__(f"session {session_id} crashed")
        self.session_id = session_id
        self.active = active


@dataclass(eq=False)
class SessionActor:
    session_id: str
    ctx: SessionContext
    mailbox: trio.MemoryReceiveChannel[SessionMessage]
    handle: SessionHandle
    session: SessionRecord | None = None
    members: dict[str, Member] = field(default_factory=dict)
    last_seq: int = 0
    # chat marks as stored, per user (absent: none stored), so a join needs no read. This
    # actor is their only writer (`chat.receipt`; a newer owner fences its writes); a user
    # whose last raise may have committed unanswered (the write failed or timed out) is in
    # `marks_unsure` and read from storage again at its next join (`presence.marks_of`)
    marks: dict[str, Marks] = field(default_factory=dict)
    marks_unsure: set[str] = field(default_factory=set)
    ledger: Ledger | None = None
    billing_final: bool = False
    orphan_since: float | None = None  # Trio time since nobody is joined (active sessions)
    next_tick_ms: int | None = None
    timer: BillingTimer[SessionMessage] | None = None
    checkpoint_owed: bool = False  # a tick checkpoint failed: write one at the next wake-up
    offset_ms: int = 0  # added to the process's wall clock for this session's instants
    _taken: collections.deque[SessionMessage] = field(default_factory=collections.deque)
    _idle_until: float = math.inf  # an idle actor retires once this has passed
    _nursery: trio.Nursery | None = None
    _storage: SessionStorage | None = None

    # ------------------------------------------------------------ what handlers use

    @property
    def storage(self) -> StorageHandle:
        """Storage as this session writes it: stamped with its owner epoch in a cluster."""
        if self._storage is None:
            self._storage = SessionStorage(self.ctx.storage, self.ctx.ownership)
        return self._storage  # type: ignore[return-value]

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    def now_ms(self) -> int:
        return self.ctx.clock.now_ms() + self.offset_ms

    def to_session_ms(self, wall_ms: int) -> int:
        """An instant the process's clock gave (a connection's last pong) in session time."""
        return wall_ms + self.offset_ms

    def reply(self, to: ReplyTo | None, result: Reply | ParleyError) -> None:
        if to is not None:
            self.ctx.delivery.reply(to, result)

    def deliver(self, conn: ConnectionRef, item: Outgoing) -> None:
        self.ctx.delivery.deliver(conn, item)

    def broadcast(self, item: Outgoing, *, exclude: str | None = None, users: tuple[str, ...] | None = None) -> None:
        for user, member in self.members.items():
            if user != exclude and (users is None or user in users):
                self.ctx.delivery.deliver(member.conn, item)

    def may_see(self, caller: Identity) -> None:
        presence.check_participant(self, caller)

    def publish_routes(self) -> None:
        """After every change of `members`: the snapshot connections relay signals by."""
        self.handle.routes = {user: member.conn for user, member in self.members.items()}

    # ------------------------------------------------------------ lifetime

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until retired. A crash answers what is queued, then raises SessionCrashed."""
        clock = self.ctx.billing_clock
        assert clock is not None, "session actors run under a supervisor, which runs the billing clock"
        self.timer = clock.timer(self.handle.timer_mailbox(), BillingDue(), _checkpoint_failed)
        task_status.started()
        try:
            await self._live()
        except Exception as exc:
            self._crashed()
            raise SessionCrashed(
                self.session_id, active=self.session is not None and self.session.state == ACTIVE
            ) from exc
        finally:
            self.handle.routes = None  # nobody relays through a session that is not serving
            self.timer.close()  # the clock forgets this session
            epoch = self._storage.epoch if self._storage is not None else None
            if self.ctx.ownership is not None and epoch is not None:
                assert self._storage is not None
                self.ctx.ownership.stopped(
                    self.session_id, epoch, fenced=self._storage.fenced,
                    finished=self.session is None or self.session.state in (ENDED, CANCELLED),
                )

    async def _live(self) -> None:
        try:
            await self._load()
        except (NotFound, StorageUnavailable, Fenced, trio.TooSlowError) as exc:
            # Fenced: the claim lost to another node, or this node's lease lapsed; not a crash,
            # the callers retry and reach whoever owns the session
            error = exc if isinstance(exc, ParleyError) else StorageUnavailable("storage did not answer")
            self._refuse_queued(error)
            return
        metrics.SESSIONS.inc()
        try:
            await self._serve()
        finally:
            metrics.SESSIONS.dec()
            if self.ledger is not None and self.ledger.is_open:
                metrics.BILLING_ACTIVE.dec()

    async def _load(self) -> None:
        storage = self.storage
        if self.ctx.ownership is not None:
            epoch = await self.ctx.ownership.claim(self.session_id)
            assert self._storage is not None
            self._storage.epoch = epoch
        loaded = await storage.read(sm.LoadSession(session_id=self.session_id))  # one round trip
        self.session, self.last_seq = loaded.session, loaded.last_seq
        self.marks = dict(loaded.marks)
        state = loaded.billing if self.session.state == ACTIVE else None
        latest = max(
            [t for t in (self.session.started_at, self.session.created_at) if t is not None]
            + ([state.checkpoint_at] if state and state.checkpoint_at else [])
            + [end for _, end in (state.segments if state else ())]
        )
        self.offset_ms = max(0, latest - self.ctx.clock.now_ms())
        if self.offset_ms:
            log.warning("session %s: the clock is %d ms behind its last stored instant; its instants keep going "
                        "forward from there", self.session_id, self.offset_ms)
        if self.session.state == ACTIVE:
            self.ledger = Ledger(
                rate_per_minute=self.session.rate_per_minute,
                max_amount_minor=self.session.max_amount_minor,
                segments=list(state.segments) if state else [],
            )
            self.orphan_since = trio.current_time()
        self._idle_until = trio.current_time() + IDLE_GRACE

    def _audit(self, message: SessionMessage, refusal: Forbidden) -> None:
        asker = getattr(message, "caller", None) or getattr(message, "conn", None)
        audit.refused(
            who=getattr(asker, "user", None), what=type(message).__name__, session=self.session_id,
            why=refusal.message,
        )

    def _crashed(self) -> None:
        """The actor is failing: its members hear so, and every queued request gets its answer."""
        metrics.SESSION_CRASHES.inc()
        self.broadcast(wire.error(None, "internal", "the session failed; join it again", session=self.session_id))
        self._refuse_queued(Internal("the session failed; try again"))

    def _refuse_queued(self, error: ParleyError) -> None:
        """Answer everything taken or queued with `error`, then close the mailbox (no await
        in between, so nothing can slip in after the last look)."""
        self.handle.routes = None
        while True:
            if self._taken:
                message = self._taken.popleft()
            else:
                try:
                    message = self.mailbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            self.reply(getattr(message, "reply", None), error)
        self.mailbox.close()

    async def _serve(self) -> None:
        while True:
            if self._taken:
                await self._dispatch(self._taken.popleft())
            else:
                deadline = self._next_deadline()
                # a message already queued is taken without a reschedule (unless a deadline has
                # passed: that comes first), so the messages a pass of the billing clock or a burst
                # of frames queued together are handled together (their writes share a commit)
                message = self._queued_nowait() if deadline > trio.current_time() else None
                if message is None:
                    if deadline == math.inf:  # the common case: no timer to arm
                        message = await self.mailbox.receive()
                    else:
                        with trio.move_on_at(deadline):
                            message = await self.mailbox.receive()
                if message is None:
                    await self._on_deadline()
                else:
                    self._idle_until = -math.inf  # from now on, idle means retire at once
                    await self._dispatch(message)
            if self._storage is not None and self._storage.fenced:
                # another node owns the session now: give it up at once, every queued
                # request answered with an error its client retries (reaching the new owner)
                log.warning("session %s: a newer owner exists; giving it up", self.session_id)
                self._refuse_queued(Fenced("the session moved to another node; try again"))
                return
            if self._idle() and not self._taken and trio.current_time() >= self._idle_until:
                if not self._take_one_nowait():
                    self.mailbox.close()
                    return

    def _queued_nowait(self) -> SessionMessage | None:
        try:
            return self.mailbox.receive_nowait()
        except trio.WouldBlock:
            return None

    def _take_one_nowait(self) -> bool:
        message = self._queued_nowait()
        if message is None:
            return False
        self._taken.append(message)
        return True

    def _idle(self) -> bool:
        assert self.session is not None
        return not self.members and self.session.state != ACTIVE

    def _next_deadline(self) -> float:
        deadline = self._idle_until if self._idle() else math.inf
        if self.orphan_since is not None and not self.members:
            deadline = min(deadline, self.orphan_since + self.settings.orphan_timeout)
        for member in self.members.values():
            if member.typing_until is not None:
                deadline = min(deadline, member.typing_until)
            if member.conn.node is not None:  # on another node: dropped once silent too long
                silent_at = member.alive_ms + presence.silence_ms(self)
                deadline = min(deadline, trio.current_time() + max(0, silent_at - self.now_ms()) / 1000)
        return deadline

    async def _on_deadline(self) -> None:
        now = trio.current_time()
        presence.expire_typing(self, now)
        await presence.drop_silent(self)
        if self.orphan_since is not None and not self.members:
            await lifecycle.end_if_orphaned(self, now)

    def take_chat_batch(self, first: SendChat) -> list[SendChat]:
        """`first` and the chat sends queued right behind it, so one storage round trip (one
        group commit) serves them all. The first other message stops the batch and is
        handled next: the mailbox order is never changed."""
        batch = [first]
        while len(batch) < CHAT_BATCH and not self._taken:
            try:
                message = self.mailbox.receive_nowait()
            except trio.WouldBlock:
                break
            if isinstance(message, SendChat):
                batch.append(message)
            else:
                self._taken.append(message)
        return batch

    async def _dispatch(self, message: SessionMessage) -> None:
        reply = getattr(message, "reply", None)
        try:
            match message:
                case JoinSession():
                    await presence.join(self, message)
                case LeaveSession():
                    await presence.leave(self, message)
                case MemberAlive():
                    presence.alive(self, message)
                case MembersLost():
                    await presence.lost_node(self, message)
                case RelaySignal():
                    presence.relay_signal(self, message)
                case SetTyping():
                    presence.typing(self, message)
                case SendChat():
                    await chat.send(self, self.take_chat_batch(message))
                case EditChat() | DeleteChat():
                    await chat.change(self, message)
                case RaiseReceipt():
                    await chat.receipt(self, message)
                case Transition():
                    await lifecycle.transition(self, message)
                case GetLiveBilling():
                    billing.live(self, message)
                case BillingDue():
                    assert self.timer is not None
                    self.timer.woken()
                    await billing.due(self, end=lifecycle.end)
                case CheckpointFailed(error=error):
                    billing.checkpoint_failed(self, error)
                case Flush():
                    await billing.checkpoint(self)
                    self.reply(message.reply, Done())
                case _:
                    log.warning("session %s: dropped unknown message %r", self.session_id, message)
        except ParleyError as exc:
            if isinstance(exc, Forbidden):
                self._audit(message, exc)
            if reply is not None:
                self.reply(reply, exc)
            elif isinstance(exc, (StorageUnavailable, Fenced)):
                log.error("session %s: %s", self.session_id, exc)
            else:
                raise
        except trio.TooSlowError:
            if reply is not None:
                self.reply(reply, StorageUnavailable("storage did not answer in time"))
            else:
                log.error("session %s: storage did not answer in time", self.session_id)
        except Exception:
            # the actor is crashing: the request it was serving gets its one reply first
            # (a chat batch has answered each of its messages already)
            if reply is not None and not isinstance(message, SendChat):
                self.reply(reply, Internal("the session failed; try again"))
            raise
