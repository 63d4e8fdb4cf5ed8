"""WebSocket frames ↔ typed requests (PRODUCT.md section 6).

Every client frame is decoded straight into one of the tagged structs below
(msgspec validates types while it parses); sizes are checked here, so actors
behind the edge can trust what they get. Unknown fields are ignored, as the
contract lets clients and servers add fields.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import orjson

from domain.chat import MAX_BODY_CHARS, MAX_HISTORY_LIMIT
from domain.errors import BadRequest, TooLarge

MAX_ID_CHARS = 128  # session ids, user ids, client ids, refs
MAX_SIGNAL_PAYLOAD = 32 * 1024
MAX_JSON_DEPTH = 32


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
    payload: msgspec.Raw = msgspec.Raw(b"null")


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
    seq: int


class ChatHistory(_Request, tag="chat.history"):
    session: str
    before_seq: int | None = None
    after_seq: int | None = None
    limit: int = 50


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


def _depth(raw: bytes) -> int:
    """Nesting depth of a JSON document, counted without building it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x7D, 0x5D):
            depth -= 1
    return deepest


def decode_request(text: str | bytes) -> Request:
    """Parse and check one client frame. Raises FrameError (bad_request / too_large)."""
    if isinstance(text, str):
        text = text.encode()
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
            raw = bytes(payload)
            # counting brackets runs in C; only a payload that could nest too deep is walked
            if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and _depth(raw) > MAX_JSON_DEPTH:
                raise FrameError(BadRequest(f"`payload` nests deeper than {MAX_JSON_DEPTH}"), ref)
        case ChatReceipt(seq=seq):
            if seq < 0:
                raise FrameError(BadRequest("`seq` must not be negative"), ref)
        case ChatHistory(limit=limit, before_seq=before, after_seq=after):
            if not 1 <= limit <= MAX_HISTORY_LIMIT:
                raise FrameError(BadRequest(f"`limit` must be 1 to {MAX_HISTORY_LIMIT}"), ref)
            if (before is not None and before < 0) or (after is not None and after < 0):
                raise FrameError(BadRequest("seq bounds must not be negative"), ref)
        case _:
            pass
