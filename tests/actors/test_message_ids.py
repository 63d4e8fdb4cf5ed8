"""Server-made chat message ids (`actors/session/chat.py: new_message_id`): UUIDv7 in the
32 hex digits ids always had, time-ordered within a process, never repeated."""

from __future__ import annotations

import uuid

from actors.session.chat import new_message_id

AT = 1_764_590_000_000  # 2025-12-01, in ms


def test_an_id_is_a_uuid7_of_its_millisecond_in_32_hex_digits():
    made = new_message_id(AT)
    assert len(made) == 32 and int(made, 16) >= 0 and made == made.lower()
    parsed = uuid.UUID(made)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert parsed.int >> 80 == AT


def test_ids_sort_in_the_order_they_were_made_and_never_repeat():
    made = [new_message_id(AT + i // 1000) for i in range(100_000)]  # 1,000 per millisecond
    assert made == sorted(made)
    assert len(set(made)) == len(made)
