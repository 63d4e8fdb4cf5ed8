"""`domain.clock.iso`: epoch ms → RFC 3339 UTC text, exact to the millisecond (it keeps the
last second's text, so every call must still give the text of its own instant)."""

from __future__ import annotations

import datetime as dt

from domain.clock import iso


def _reference(ms: int) -> str:
    at = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=ms)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def test_instants_are_rfc3339_utc_with_milliseconds():
    assert iso(None) is None
    assert iso(0) == "1970-01-01T00:00:00.000Z"
    assert iso(1_764_590_400_123) == "2025-12-01T12:00:00.123Z"
    assert iso(-1) == "1969-12-31T23:59:59.999Z"


def test_each_call_gives_its_own_instant_within_and_across_seconds():
    base = 1_764_590_400_000
    for ms in (base, base + 1, base + 999, base + 1000, base - 1, base + 999, base + 86_400_000, base, 0, -1001):
        assert iso(ms) == _reference(ms), ms
