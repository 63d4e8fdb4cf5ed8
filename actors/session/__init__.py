"""The session actor, split by concern around one loop.

    actor.py      the loop, the handle, the lifetime (load, retire, crash)
    messages.py   what may be asked of a session (its mailbox's one union type)
    presence.py   join, leave, liveness, typing, signaling
    chat.py       send (batched), edit, delete, receipts
    lifecycle.py  start, cancel, end (by a user, the orphan rule, the budget)
    billing.py    the ledger, ticks, checkpoints, the budget warning

Only the loop in actor.py calls the handlers, one message at a time, so the
session's state has one owner.
"""

from .actor import MAILBOX_SIZE, SessionActor, SessionContext, SessionCrashed, SessionGone, SessionHandle
from .messages import (
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

__all__ = [
    "MAILBOX_SIZE", "DeleteChat", "EditChat", "Flush", "GetLiveBilling", "JoinSession", "LeaveSession",
    "MemberAlive", "MembersLost", "RaiseReceipt", "RelaySignal", "SendChat", "SessionActor", "SessionContext",
    "SessionCrashed", "SessionGone", "SessionHandle", "SessionMessage", "SetTyping", "Transition",
]
