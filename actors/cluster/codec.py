"""What crosses between nodes, as JSON bytes: session messages, delivery items, replies, errors.

Every value here is a frozen dataclass of plain fields (actors/ports.py,
actors/session/messages.py, protocol/replies.py and the records they carry), so
the codec is one generic walk: a dataclass becomes `{"@": name, "f": fields}`,
bytes `{"@b": base64}`, a `ParleyError` `{"@e": name, "m": message, "x": extra}`;
lists come back as tuples (the dataclasses hold tuples). Only the types listed
in `_TYPES` decode: anything else is a bug on the sending side and raises.

`encode(value, here=...)` also says which node a value's local addresses belong
to: a `ConnectionRef` or `ToCaller` with `node=None` (this process) leaves as
`node=here`, so the receiver can answer across the cluster.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import orjson

from domain import errors
from domain.chat import ChatMessage, Marks
from domain.identity import Identity
from domain.session import SessionRecord
from protocol import replies

from .. import ports
from ..session import messages

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        ports.ConnectionRef, ports.ToConnection, ports.ToCaller, ports.ChatFrame, ports.ChatCursor,
        Identity, SessionRecord, ChatMessage, Marks,
        messages.JoinSession, messages.LeaveSession, messages.MemberAlive, messages.MembersLost,
        messages.RelaySignal, messages.SendChat, messages.EditChat, messages.DeleteChat, messages.RaiseReceipt,
        messages.SetTyping, messages.Transition, messages.GetLiveBilling, messages.Flush,
        replies.Done, replies.Joined, replies.Left, replies.ChatAccepted, replies.ChatChanged,
        replies.MarksRaised, replies.SessionChanged, replies.LiveBilling,
    )
}
_ERRORS: dict[str, type[errors.ParleyError]] = {
    cls.__name__: cls for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.ParleyError)
}


def to_plain(value: Any, here: str | None = None) -> Any:
    """A JSON-able form of `value`; local addresses stamped with node `here`."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (ports.ConnectionRef, ports.ToCaller)) and value.node is None and here is not None:
        value = dataclasses.replace(value, node=here)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if name not in _TYPES:
            raise TypeError(f"{name} does not cross nodes")
        return {"@": name, "f": {f.name: to_plain(getattr(value, f.name), here) for f in dataclasses.fields(value)}}
    if isinstance(value, bytes):
        return {"@b": base64.b64encode(value).decode()}
    if isinstance(value, errors.ParleyError):
        return {"@e": type(value).__name__, "m": value.message, "x": to_plain(value.extra, here)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v, here) for v in value]
    if isinstance(value, dict):
        return {"#": {str(k): to_plain(v, here) for k, v in value.items()}}
    raise TypeError(f"{type(value).__name__} does not cross nodes")


def from_plain(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(from_plain(v) for v in value)
    if not isinstance(value, dict):
        return value
    if "@" in value:
        cls = _TYPES[value["@"]]
        return cls(**{k: from_plain(v) for k, v in value["f"].items()})
    if "@b" in value:
        return base64.b64decode(value["@b"])
    if "@e" in value:
        cls = _ERRORS.get(value["@e"], errors.Internal)
        error = cls.__new__(cls)
        extra = from_plain(value["x"])
        errors.ParleyError.__init__(error, value["m"], **extra)
        if isinstance(error, errors.Conflict):
            error.state = extra.get("state")
        return error
    return {k: from_plain(v) for k, v in value["#"].items()}


def encode(value: Any, *, here: str | None = None) -> bytes:
    return orjson.dumps(to_plain(value, here))


def decode(data: bytes) -> Any:
    return from_plain(orjson.loads(data))
