"""Chat message records (PRODUCT.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_BODY_CHARS = 8_000
MAX_HISTORY_LIMIT = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    id: str
    session_id: str
    seq: int
    client_id: str
    sender: str
    body: str | None
    created_at: int
    edited_at: int | None = None
    deleted: bool = False



@dataclass(frozen=True, slots=True, kw_only=True)
class Marks:
    delivered_seq: int = 0
    read_seq: int = 0
