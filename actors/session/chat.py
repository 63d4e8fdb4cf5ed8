"""Session handlers for chat: send (in batches), edit, delete, receipts.

The session decides who may write and delivers; the database numbers each
message (`seq`) inside the transaction that stores it. A batch of sends queued
together is stored in one round trip (one group commit), then acked and
delivered in `seq` order. Each delivery is a `ChatFrame` carrying its `seq`, so
the receiving connection can keep its client's view gapless and duplicate-free
(it fills gaps from storage itself).
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING

import trio

from domain import metrics
from domain.chat import ChatMessage
from domain.errors import BadRequest, Conflict, Forbidden, Internal, NotJoined, ParleyError, StorageUnavailable
from domain.session import ACTIVE, SCHEDULED
from protocol import wire
from protocol.replies import ChatAccepted, ChatChanged, MarksRaised
from storage import messages as sm

from ..ports import ChatFrame
from . import presence
from .messages import DeleteChat, EditChat, RaiseReceipt, SendChat

if TYPE_CHECKING:
    from .actor import SessionActor


_ID_NODE = int.from_bytes(os.urandom(4), "big")  # this process's part of every id it makes
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(5), "big") >> 1)  # 39 bits to start from


def new_message_id(at_ms: int) -> str:
    """A server-made message id: a UUIDv7 (RFC 9562) in 32 hex digits, as `uuid4().hex` was.

    48 bits of `at_ms` (the message's `created_at`), then a 42-bit counter per process (in the
    12 `rand_a` bits and 30 of `rand_b`; it starts at random), then 32 random bits drawn once per
    process. Ids made later in a process sort after earlier ones (the counter, within one
    millisecond too), so the `messages` id index is appended to instead of written at random,
    and no two ids of one process are equal; another process differs in its counter's start and
    its random bits. No system call, no `UUID` object: about a quarter of the time `uuid4().hex` takes."""
    n = next(_ID_COUNTER) & 0x3FF_FFFF_FFFF
    return "%032x" % (
        (at_ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (n >> 30) << 64 | 0b10 << 62 | (n & 0x3FFF_FFFF) << 32 | _ID_NODE
    )


def chat_frame(session_id: str, message: ChatMessage) -> ChatFrame:
    text = wire.encode({"type": "chat.message", "session": session_id, **wire.record(message)})
    return ChatFrame(session_id=session_id, seq=message.seq, text=text)


def _candidate(s: SessionActor, message: SendChat, seq_hint: int) -> ChatMessage:
    session = s.session
    assert session is not None
    caller = message.caller
    if message.conn_id is not None:
        member = s.members.get(caller.user)
        if member is None or member.conn.id != message.conn_id:
            raise NotJoined("join the session first")
    elif not session.is_participant(caller.user):
        raise Forbidden("only participants may write to this session's chat")
    if session.state not in (ACTIVE, SCHEDULED):
        raise Conflict(f"the session is {session.state}", state=session.state)
    created_at = s.now_ms()
    return ChatMessage(
        id=new_message_id(created_at),
        session_id=s.session_id,
        seq=seq_hint,  # a hint (right unless another writer numbered some): the database hands out the real one
        client_id=message.client_id,
        sender=caller.user,
        body=message.body,
        created_at=created_at,
    )


async def send(s: SessionActor, batch: list[SendChat]) -> None:
    """Store a batch of messages in one round trip, then ack and deliver each in seq order."""
    accepted: list[tuple[SendChat, ChatMessage]] = []
    for message in batch:
        try:
            accepted.append((message, _candidate(s, message, s.last_seq + len(accepted) + 1)))
        except ParleyError as exc:
            s.reply(message.reply, exc)
    if not accepted:
        return
    try:
        results = await s.storage.write_many([sm.InsertMessage(message=c) for _, c in accepted])
    except (ParleyError, trio.TooSlowError) as exc:
        error = exc if isinstance(exc, ParleyError) else StorageUnavailable("storage did not answer in time")
        for message, _ in accepted:
            s.reply(message.reply, error)
        return
    except BaseException:
        for message, _ in accepted:  # the actor is going down: nobody waits for nothing
            s.reply(message.reply, Internal("the session failed; try again"))
        raise
    new = 0
    for (message, _), result in zip(accepted, results):
        try:
            stored, duplicate = result.unwrap()
        except ParleyError as exc:
            s.reply(message.reply, exc)
            continue
        new += not duplicate
        _stored(s, message, stored, duplicate)
    if new:
        metrics.CHAT_MESSAGES.inc(new)  # once a batch: the counter takes a lock


def _stored(s: SessionActor, message: SendChat, stored: ChatMessage, duplicate: bool) -> None:
    sender = message.caller.user
    if not duplicate:
        s.last_seq = max(s.last_seq, stored.seq)
    s.reply(message.reply, ChatAccepted(session_id=s.session_id, message=stored, duplicate=duplicate))
    if duplicate:
        return
    frame = chat_frame(s.session_id, stored)
    member = s.members.get(sender)
    if message.conn_id is None:  # posted over REST: the sender's own socket sees it too
        s.broadcast(frame)
    else:
        s.broadcast(frame, exclude=sender)
        if member is not None:
            s.deliver(member.conn, ChatFrame(session_id=s.session_id, seq=stored.seq, text=None))
    if member is not None:
        member.typing_until = None
        presence.show_typing(s, member, False, trio.current_time())


async def change(s: SessionActor, message: EditChat | DeleteChat) -> None:
    caller = message.caller
    s.may_see(caller)
    now_ms = s.now_ms()
    if isinstance(message, EditChat):
        changed = await s.storage.write(sm.EditMessage(
            session_id=s.session_id, message_id=message.message_id, editor=caller.user, body=message.body, at=now_ms,
        ))
        kind = "chat.updated"
    else:
        changed = await s.storage.write(sm.DeleteMessage(
            session_id=s.session_id, message_id=message.message_id, by=caller.user, as_admin=caller.is_admin,
            at=now_ms,
        ))
        kind = "chat.deleted"
    s.reply(message.reply, ChatChanged(session_id=s.session_id, message=changed))
    s.broadcast(wire.encode({"type": kind, "session": s.session_id, **wire.record(changed)}))


async def receipt(s: SessionActor, message: RaiseReceipt) -> None:
    presence.member_of(s, message.conn)
    if message.seq > s.last_seq:
        raise BadRequest(f"seq {message.seq} is beyond the last message ({s.last_seq})")
    user = message.conn.user
    s.marks_unsure.add(user)  # until storage answers: it may commit without telling us
    marks = await s.storage.write(sm.RaiseMark(
        session_id=s.session_id, user=user, kind=message.kind, seq=message.seq,
    ))
    s.marks[user] = marks
    s.marks_unsure.discard(user)
    mark = marks.read_seq if message.kind == "read" else marks.delivered_seq
    s.reply(message.reply, MarksRaised(delivered_seq=marks.delivered_seq, read_seq=marks.read_seq))
    if mark == message.seq:  # a stale receipt (below the mark) tells nobody anything new
        s.broadcast(
            wire.event("receipt", session=s.session_id, user=user, kind=message.kind, seq=mark), exclude=user,
        )
