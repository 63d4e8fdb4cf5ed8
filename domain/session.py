"""Session records and the lifecycle rules of PRODUCT.md section 3."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import Conflict

SCHEDULED = "scheduled"
ACTIVE = "active"
ENDED = "ended"
CANCELLED = "cancelled"
STATES = (SCHEDULED, ACTIVE, ENDED, CANCELLED)

# transition name → (states it may start from, state it leads to)
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "start": (frozenset({SCHEDULED}), ACTIVE),
    "end": (frozenset({ACTIVE}), ENDED),
    "cancel": (frozenset({SCHEDULED}), CANCELLED),
}

END_ENDED = "ended"
END_ORPHANED = "orphaned"
END_LIMIT_REACHED = "limit_reached"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRecord:
    id: str
    payer: str
    provider: str
    guests: tuple[str, ...] = ()
    rate_per_minute: int
    currency: str
    max_amount_minor: int | None = None
    state: str = SCHEDULED
    created_at: int  # epoch ms
    started_at: int | None = None
    ended_at: int | None = None
    end_reason: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    created_by: str = ""
    owner_node: str | None = None  # cluster mode: the node whose actor runs it (shown to admins)

    @property
    def participants(self) -> tuple[str, ...]:
        return (self.payer, self.provider, *self.guests)

    def is_participant(self, user: str) -> bool:
        return user == self.payer or user == self.provider or user in self.guests

    @property
    def joinable(self) -> bool:
        return self.state in (SCHEDULED, ACTIVE)



def check_transition(session: SessionRecord, name: str) -> str:
    """Return the state `name` leads to, or raise Conflict naming the current state."""
    allowed_from, to_state = TRANSITIONS[name]
    if session.state not in allowed_from:
        raise Conflict(f"cannot {name} a session that is {session.state}", state=session.state)
    return to_state


def apply_transition(
    session: SessionRecord, name: str, *, at_ms: int, end_reason: str | None = None
) -> SessionRecord:
    to_state = check_transition(session, name)
    changes: dict[str, Any] = {"state": to_state}
    if to_state == ACTIVE:
        changes["started_at"] = at_ms
    elif to_state in (ENDED, CANCELLED):
        changes["ended_at"] = at_ms
        changes["end_reason"] = end_reason or (END_ENDED if to_state == ENDED else "cancelled")
    return dataclasses.replace(session, **changes)
