"""The append-only timeline of a session: the record a disputed bill is explained from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CREATED = "created"
STARTED = "started"
JOINED = "joined"
LEFT = "left"
DROPPED = "dropped"
REPLACED = "replaced"
ENDED = "ended"
CANCELLED = "cancelled"
BILLING_STARTED = "billing_started"
BILLING_STOPPED = "billing_stopped"
BILLING_LIMIT_NEAR = "billing_limit_near"
BILLING_GAP = "billing_gap"  # the server was down: time not billed
BILLING_FINALIZED = "billing_finalized"
TAKEN_OVER = "taken_over"  # cluster mode: another node claimed the session after its owner's lease expired


@dataclass(frozen=True, slots=True, kw_only=True)
class TimelineEntry:
    session_id: str
    at: int  # epoch ms
    kind: str
    actor: str  # a user id, or "server"
    detail: dict[str, Any] = field(default_factory=dict)

