"""Billing arithmetic (PRODUCT.md section 4), in integers only.

A `Ledger` holds the billable segments of one session as `[start, end)` pairs of
epoch milliseconds, plus the start of the segment that is open right now (both
payer and provider present while the session is active). It never reads a clock:
the session actor passes every instant in, which is what makes billing testable
under a fake clock and provable with property tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MS_PER_MINUTE = 60_000
WARNING_LEAD_MS = 60_000  # "limit_near" comes one minute of billable time before the limit


def amount_minor(billable_ms: int, rate_per_minute: int) -> int:
    """ceil(billable_ms * rate / 60000) without floats."""
    return -(-(billable_ms * rate_per_minute) // MS_PER_MINUTE)


def limit_ms(max_amount_minor: int | None, rate_per_minute: int) -> int | None:
    """The most billable time whose amount stays within the budget, or None."""
    if max_amount_minor is None or rate_per_minute <= 0:
        return None
    return (max_amount_minor * MS_PER_MINUTE) // rate_per_minute


@dataclass(slots=True)
class Ledger:
    rate_per_minute: int
    max_amount_minor: int | None = None
    segments: list[tuple[int, int]] = field(default_factory=list)
    open_since: int | None = None
    warned: bool = False

    @property
    def closed_ms(self) -> int:
        return sum(end - start for start, end in self.segments)

    @property
    def is_open(self) -> bool:
        return self.open_since is not None

    @property
    def limit_ms(self) -> int | None:
        return limit_ms(self.max_amount_minor, self.rate_per_minute)

    def billable_ms(self, now_ms: int) -> int:
        total = self.closed_ms
        if self.open_since is not None:
            total += max(0, now_ms - self.open_since)
        limit = self.limit_ms
        return total if limit is None else min(total, limit)

    def amount(self, now_ms: int) -> int:
        return amount_minor(self.billable_ms(now_ms), self.rate_per_minute)

    def open(self, at_ms: int) -> None:
        if self.open_since is None:
            # a segment never starts before the previous one ended
            last_end = self.segments[-1][1] if self.segments else at_ms
            self.open_since = max(at_ms, last_end)

    def close(self, at_ms: int) -> None:
        """Close the open segment at `at_ms` (clamped so it is never negative)."""
        if self.open_since is None:
            return
        start, self.open_since = self.open_since, None
        end = max(start, at_ms)
        limit = self.limit_ms
        if limit is not None:
            end = min(end, start + max(0, limit - self.closed_ms))
        if end > start:
            self.segments.append((start, end))

    def snapshot_segments(self, now_ms: int) -> list[tuple[int, int]]:
        """Closed segments plus the open one cut at `now_ms`: what a checkpoint stores."""
        segments = list(self.segments)
        if self.open_since is not None:
            end = self.open_since + (self.billable_ms(now_ms) - self.closed_ms)
            if end > self.open_since:
                segments.append((self.open_since, end))
        return segments

    def limit_at(self) -> int | None:
        """The instant the open segment reaches the budget, if it is open and capped."""
        limit = self.limit_ms
        if limit is None or self.open_since is None:
            return None
        return self.open_since + max(0, limit - self.closed_ms)

    def warning_at(self) -> int | None:
        at = self.limit_at()
        if at is None or self.warned:
            return None
        return at - WARNING_LEAD_MS
