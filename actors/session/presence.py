"""Session handlers for who is there: join, leave, liveness, typing, and signaling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from domain import timeline
from domain.chat import Marks
from domain.clock import iso
from domain.errors import Conflict, Forbidden, NotJoined
from domain.identity import Identity
from domain.session import ACTIVE
from protocol import wire
from protocol.replies import Done, Joined, Left
from storage import messages as sm

from ..ports import ChatCursor, ConnectionRef
from . import billing
from .messages import JoinSession, LeaveSession, MemberAlive, MembersLost, RelaySignal, SetTyping

if TYPE_CHECKING:
    from .actor import SessionActor

TYPING_BURST = 4  # typing:true forwards a user may make at once; then one per second


@dataclass(eq=False, slots=True)
class Member:
    """One joined user, through exactly one connection."""

    conn: ConnectionRef
    alive_ms: int  # last instant it was known alive (session time): checkpoints never pass it
    typing_until: float | None = None  # Trio time the server turns typing off
    typing_tokens: float = TYPING_BURST
    typing_tokens_at: float = -math.inf
    typing_shown: bool = False  # what the others were last told

    @property
    def user(self) -> str:
        return self.conn.user


def check_participant(s: SessionActor, caller: Identity) -> None:
    assert s.session is not None
    if not (caller.is_admin or s.session.is_participant(caller.user)):
        raise Forbidden("not a participant of this session")


def member_of(s: SessionActor, conn: ConnectionRef) -> Member:
    member = s.members.get(conn.user)
    if member is None or member.conn.id != conn.id:
        raise NotJoined("join the session first")
    return member


def joined_reply(s: SessionActor) -> Joined:
    assert s.session is not None
    return Joined(session=s.session, participants=tuple(sorted(s.members)), last_seq=s.last_seq)


async def marks_of(s: SessionActor, user: str) -> Marks:
    """`user`'s stored marks: as this actor last stored or loaded them, or read again when a
    raise of them may have committed without an answer."""
    if user in s.marks_unsure:
        _, marks = await s.storage.read(sm.GetChatState(session_id=s.session_id, user=user))
        s.marks[user] = marks
        s.marks_unsure.discard(user)
        return marks
    return s.marks.get(user) or Marks()


async def join(s: SessionActor, message: JoinSession) -> None:
    session = s.session
    assert session is not None
    conn = message.conn
    check_participant(s, conn.identity)
    if not session.joinable:
        raise Conflict(f"the session is {session.state}", state=session.state)
    previous = s.members.get(conn.user)
    if previous is not None and previous.conn.id == conn.id:
        s.reply(message.reply, joined_reply(s))
        return
    marks = await marks_of(s, conn.user)
    now_ms = s.now_ms()
    entries = [timeline.TimelineEntry(
        session_id=s.session_id, at=now_ms, kind=timeline.JOINED, actor=conn.user, detail={"connection": conn.id},
    )]
    if previous is not None:
        entries.insert(0, timeline.TimelineEntry(
            session_id=s.session_id, at=now_ms, kind=timeline.REPLACED, actor=conn.user,
            detail={"connection": previous.conn.id, "by": conn.id},
        ))
    # durable before the ok: a join storage cannot record is refused cleanly (and retried),
    # and in a cluster this write is the fencing check that keeps a stale owner from taking it
    await s.storage.write(sm.AppendTimeline(entries=tuple(entries)))
    if previous is not None:
        s.deliver(previous.conn, wire.event("replaced", session=s.session_id))
    s.members[conn.user] = Member(conn=conn, alive_ms=now_ms)
    s.publish_routes()
    s.orphan_since = None
    s.reply(message.reply, joined_reply(s))
    # the connection streams the offline queue itself, from storage, before any live message
    s.deliver(conn, ChatCursor(session_id=s.session_id, after_seq=marks.delivered_seq, last_seq=s.last_seq))
    s.broadcast(wire.event("presence", session=s.session_id, user=conn.user, state="joined"), exclude=conn.user)
    was_billing = s.ledger is not None and s.ledger.is_open
    await billing.record_presence(s, now_ms)
    if was_billing and conn.user in (session.payer, session.provider):
        s.deliver(conn, billing.billing_frame(s, now_ms))  # the meter where it stands


async def leave(s: SessionActor, message: LeaveSession) -> None:
    conn = message.conn
    member = s.members.get(conn.user)
    if member is None or member.conn.id != conn.id:
        if message.reply is not None:
            raise NotJoined("not joined to this session")
        return
    del s.members[conn.user]
    s.publish_routes()
    now_ms = s.now_ms()
    last_alive_ms = None if message.last_alive_ms is None else s.to_session_ms(message.last_alive_ms)
    at_ms = now_ms if last_alive_ms is None else min(now_ms, last_alive_ms)
    if not s.members and s.session is not None and s.session.state == ACTIVE:
        s.orphan_since = trio.current_time()
    if member.typing_shown:
        s.broadcast(wire.event("typing", session=s.session_id, user=conn.user, active=False))
    s.broadcast(wire.event("presence", session=s.session_id, user=conn.user, state="left"))
    kind = timeline.DROPPED if message.reason == "dropped" else timeline.LEFT
    detail: dict[str, Any] = {"connection": conn.id, "reason": message.reason}
    if last_alive_ms is not None:
        detail["last_alive"] = iso(last_alive_ms)
    s.reply(message.reply, Left(session_id=s.session_id))
    await billing.record_presence(s, at_ms, extra=(timeline.TimelineEntry(
        session_id=s.session_id, at=now_ms, kind=kind, actor=conn.user, detail=detail,
    ),))


def alive(s: SessionActor, message: MemberAlive) -> None:
    member = s.members.get(message.conn.user)
    if member is not None and member.conn.id == message.conn.id:
        member.alive_ms = max(member.alive_ms, min(s.now_ms(), s.to_session_ms(message.at_ms)))


SILENT_HEARTBEATS = 3  # a member on another node not reported alive for this many intervals is gone


def silence_ms(s: SessionActor) -> int:
    return int(SILENT_HEARTBEATS * s.settings.heartbeat * 1000)


async def drop_silent(s: SessionActor) -> None:
    """Members on other nodes whose alive reports stopped (their leave was lost on the way:
    Redis restarted) leave at their last reported instant, so no ghost is ever billed."""
    now_ms = s.now_ms()
    for member in [m for m in s.members.values() if m.conn.node is not None]:
        if now_ms - member.alive_ms >= silence_ms(s):
            last_alive_wall_ms = member.alive_ms - s.offset_ms
            await leave(s, LeaveSession(conn=member.conn, reason="dropped", last_alive_ms=last_alive_wall_ms))


async def lost_node(s: SessionActor, message: MembersLost) -> None:
    """Members whose connections were on a node that died leave at their last known-alive instant."""
    for member in [m for m in s.members.values() if m.conn.node == message.node]:
        last_alive_wall_ms = member.alive_ms - s.offset_ms  # `leave` takes the process's wall clock
        await leave(s, LeaveSession(conn=member.conn, reason="dropped", last_alive_ms=last_alive_wall_ms))


def relay_signal(s: SessionActor, message: RelaySignal) -> None:
    member_of(s, message.conn)
    target = s.members.get(message.to)
    if target is None:
        raise NotJoined(f"{message.to} is not joined to this session")
    s.deliver(target.conn, wire.signal_event(s.session_id, message.conn.user, message.kind, message.payload))
    s.reply(message.reply, Done())


def typing(s: SessionActor, message: SetTyping) -> None:
    """Others hear of changes only (a refresh just keeps typing alive for `typing_timeout`),
    and a user toggling on and off gets `TYPING_BURST` forwards, then one a second."""
    member = member_of(s, message.conn)
    now = trio.current_time()
    s.reply(message.reply, Done())
    if message.active:
        member.typing_until = now + s.settings.typing_timeout
        show_typing(s, member, True, now)
    else:
        member.typing_until = None
        show_typing(s, member, False, now)


def expire_typing(s: SessionActor, now: float) -> None:
    for member in list(s.members.values()):
        if member.typing_until is not None and member.typing_until <= now:
            member.typing_until = None
            show_typing(s, member, False, now)


def show_typing(s: SessionActor, member: Member, active: bool, now: float) -> None:
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
    s.broadcast(wire.event("typing", session=s.session_id, user=member.user, active=active), exclude=member.user)
