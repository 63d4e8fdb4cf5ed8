"""What a session answers to one request, as plain values, and their `ok` frames.

A session actor answers every request that carries a reply address with one
of these (or a `ParleyError`). The REST app reads the value itself; a WebSocket
request gets it as `{"type":"ok","ref":R, ...fields}`, encoded here so that both
edges show the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from domain.chat import ChatMessage
from domain.clock import iso
from domain.session import SessionRecord

from . import wire


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """Accepted; nothing to tell (signal, typing, flush)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Joined:
    session: SessionRecord
    participants: tuple[str, ...]
    last_seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Left:
    session_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatAccepted:
    session_id: str
    message: ChatMessage
    duplicate: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatChanged:
    session_id: str
    message: ChatMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class MarksRaised:
    delivered_seq: int
    read_seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionChanged:
    session: SessionRecord


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveBilling:
    """The bill as the session holds it right now (REST `GET …/billing` of a live session)."""

    session_id: str
    rate_per_minute: int
    currency: str
    segments: tuple[tuple[int, int], ...]
    final: bool

    @property
    def billable_ms(self) -> int:
        return sum(end - start for start, end in self.segments)


Reply = Done | Joined | Left | ChatAccepted | ChatChanged | MarksRaised | SessionChanged | LiveBilling


def ok_fields(reply: Reply) -> dict[str, Any]:
    """The fields of the WebSocket `ok` that carries `reply`."""
    match reply:
        case Done() | LiveBilling():
            return {}
        case Joined(session=session, participants=participants, last_seq=last_seq):
            return {"session": wire.record(session), "participants": list(participants), "last_seq": last_seq}
        case Left(session_id=session_id):
            return {"session": session_id}
        case ChatAccepted(session_id=session_id, message=message, duplicate=duplicate):
            fields = wire.record(message)
            return {
                "id": message.id, "seq": message.seq, "created_at": iso(message.created_at),
                "message": {**fields, "session": session_id}, "duplicate": duplicate,
            }
        case ChatChanged(session_id=session_id, message=message):
            fields = wire.record(message)
            return {"message": {**fields, "session": session_id}, **fields}
        case MarksRaised(delivered_seq=delivered, read_seq=read):
            return {"delivered_seq": delivered, "read_seq": read}
        case SessionChanged(session=session):
            return {"session": wire.record(session)}
    raise TypeError(f"not a reply: {reply!r}")


def ok_frame(ref: str, reply: Reply) -> str:
    return wire.ok(ref, **ok_fields(reply))
