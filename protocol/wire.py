"""The wire format, both directions (PRODUCT.md sections 6 and 7). Sans-IO.

Decoding: every client frame is decoded straight into one of the tagged structs
below (msgspec validates types while it parses); sizes are checked here, so
actors behind the edge can trust what they get. Unknown fields are ignored, as
the contract lets clients and servers add fields.

Encoding: server → client frames are encoded once to JSON text; an event sent
to many connections is encoded once and the same `str` goes into every outbox.
`record()` is the one JSON shape of a session, a chat message and a timeline
entry, used by the WebSocket and the REST app alike.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import orjson

from domain.chat import MAX_BODY_CHARS, MAX_HISTORY_LIMIT, ChatMessage
from domain.clock import iso
from domain.errors import BadRequest, TooLarge
from domain.session import SessionRecord
from domain.timeline import TimelineEntry

from .bounds import MAX_JSON_DEPTH, Int64, NonNegativeInt64, too_deep

MAX_ID_CHARS = 128  # session ids, user ids, client ids, refs
MAX_SIGNAL_PAYLOAD = 32 * 1024


class _Request(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    ref: str | None = None


class Hello(_Request, tag="hello"):
    token: str


class Join(_Request, tag="join"):
    session: str


class Leave(_Request, tag="leave"):
    session: str


class Signal(_Request, tag="signal"):
    session: str
    to: str
    kind: Literal["offer", "answer", "candidate", "hangup"]
    payload: msgspec.Raw


class ChatSend(_Request, tag="chat.send"):
    session: str
    client_id: str
    body: str


class ChatEdit(_Request, tag="chat.edit"):
    session: str
    id: str
    body: str


class ChatDelete(_Request, tag="chat.delete"):
    session: str
    id: str


class ChatReceipt(_Request, tag="chat.receipt"):
    session: str
    kind: Literal["delivered", "read"]
    seq: NonNegativeInt64


class ChatHistory(_Request, tag="chat.history"):
    session: str
    before_seq: NonNegativeInt64 | None = None
    after_seq: NonNegativeInt64 | None = None
    limit: Int64 = 50


class Typing(_Request, tag="typing"):
    session: str
    active: bool


class SessionEnd(_Request, tag="session.end"):
    session: str


class Ping(_Request, tag="ping"):
    pass


Request = (
    Hello
    | Join
    | Leave
    | Signal
    | ChatSend
    | ChatEdit
    | ChatDelete
    | ChatReceipt
    | ChatHistory
    | Typing
    | SessionEnd
    | Ping
)

_decoder = msgspec.json.Decoder(Request)


class FrameError(Exception):
    """A frame that cannot be served; `ref` is echoed when the frame had a readable one."""

    def __init__(self, error: BadRequest | TooLarge, ref: str | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.ref = ref


def _ref_of(text: str | bytes) -> str | None:
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    ref = raw.get("ref") if isinstance(raw, dict) else None
    return ref if isinstance(ref, str) and len(ref) <= MAX_ID_CHARS else None


def decode_request(text: str | bytes) -> Request:
    """Parse and check one client frame. Raises FrameError (bad_request / too_large)."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")  # a lone surrogate is then refused as bad UTF-8
    if too_deep(text):  # before any parser recurses into it
        raise FrameError(BadRequest(f"the frame nests deeper than {MAX_JSON_DEPTH} levels"), _ref_of(text))
    try:
        request = _decoder.decode(text)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if message.startswith("Invalid value") and "$.type" in message:
            message = f"unknown type: {message}"
        raise FrameError(BadRequest(message), _ref_of(text)) from None
    except msgspec.DecodeError as exc:
        raise FrameError(BadRequest(f"malformed JSON: {exc}"), None) from None
    ref = request.ref
    if ref is not None and len(ref) > MAX_ID_CHARS:
        raise FrameError(TooLarge(f"ref is over {MAX_ID_CHARS} characters"), None)
    _check_sizes(request)
    return request


def _check_sizes(request: Request) -> None:
    ref = request.ref
    for name in ("session", "to", "client_id", "id"):
        value = getattr(request, name, None)
        if value is None:
            continue
        if not value:
            raise FrameError(BadRequest(f"`{name}` must not be empty"), ref)
        if len(value) > MAX_ID_CHARS:
            raise FrameError(TooLarge(f"`{name}` is over {MAX_ID_CHARS} characters"), ref)
    match request:
        case ChatSend(body=body) | ChatEdit(body=body):
            if not body:
                raise FrameError(BadRequest("`body` must not be empty"), ref)
            if len(body) > MAX_BODY_CHARS:
                raise FrameError(TooLarge(f"`body` is over {MAX_BODY_CHARS} characters"), ref)
        case Signal(payload=payload):
            if len(payload) > MAX_SIGNAL_PAYLOAD:
                raise FrameError(TooLarge(f"`payload` is over {MAX_SIGNAL_PAYLOAD} bytes"), ref)
        case ChatHistory(limit=limit):
            if not 1 <= limit <= MAX_HISTORY_LIMIT:
                raise FrameError(BadRequest(f"`limit` must be 1 to {MAX_HISTORY_LIMIT}"), ref)
        case _:
            pass


# ---------------------------------------------------------------- encoding


def encode(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def ok(ref: str | None, **fields: Any) -> str:
    return encode({"type": "ok", "ref": ref, **fields})


def error(ref: str | None, code: str, message: str, **extra: Any) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message, **extra}
    if ref is not None:
        frame["ref"] = ref
    return encode(frame)


def event(type_: str, **fields: Any) -> str:
    return encode({"type": type_, **fields})


def signal_event(session_id: str, sender: str, kind: str, payload: bytes) -> str:
    """A relayed `signal`: the payload's JSON goes out as the sender wrote it (already checked)."""
    return encode({
        "type": "signal", "session": session_id, "from": sender, "kind": kind, "payload": orjson.Fragment(payload),
    })


def record(value: SessionRecord | ChatMessage | TimelineEntry) -> dict[str, Any]:
    """The JSON object of a stored record, as both edges show it."""
    match value:
        case SessionRecord():
            return {
                "id": value.id,
                "payer": value.payer,
                "provider": value.provider,
                "guests": list(value.guests),
                "rate_per_minute": value.rate_per_minute,
                "currency": value.currency,
                "max_amount_minor": value.max_amount_minor,
                "state": value.state,
                "created_at": iso(value.created_at),
                "started_at": iso(value.started_at),
                "ended_at": iso(value.ended_at),
                "end_reason": value.end_reason,
                "metadata": value.metadata,
            }
        case ChatMessage():
            return {
                "id": value.id,
                "seq": value.seq,
                "client_id": value.client_id,
                "sender": value.sender,
                "body": None if value.deleted else value.body,
                "created_at": iso(value.created_at),
                "edited_at": iso(value.edited_at),
                "deleted": value.deleted,
            }
        case TimelineEntry():
            return {"at": iso(value.at), "kind": value.kind, "actor": value.actor, "detail": value.detail}
    raise TypeError(f"no wire form for {type(value).__name__}")
