"""Instants on the wire: epoch milliseconds as RFC 3339 text."""

from __future__ import annotations

import datetime as _dt

_second: tuple[int, str] = (0, "1970-01-01T00:00:00")  # the last second formatted, and its text


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds → RFC 3339 UTC with millisecond precision.

    The text of the second is kept from the last call: a chat message's instant is formatted
    for its `ok` and again for its `chat.message`, and messages of one batch share their second."""
    global _second
    if ms is None:
        return None
    second, millis = divmod(ms, 1000)
    last, text = _second
    if second != last:
        text = _dt.datetime.fromtimestamp(second, tz=_dt.timezone.utc).replace(tzinfo=None).isoformat()
        _second = (second, text)
    return f"{text}.{millis:03d}Z"
