"""Instants on the wire: epoch milliseconds as RFC 3339 text."""

from __future__ import annotations

import datetime as _dt


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds → RFC 3339 UTC with millisecond precision."""
    if ms is None:
        return None
    return (
        _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
