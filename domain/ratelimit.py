"""Token buckets: the one rate-limit rule for WebSocket frames, WebSocket control frames and
REST writes (PRODUCT.md section 8). Sans-IO: callers pass the time (`trio.current_time()`).

A bucket holds at most `burst` tokens and gains `rate` per second; each event takes one.
`take` answers 0.0 when the event may go ahead, else the seconds until it could (what a
429's `Retry-After` says).
"""

from __future__ import annotations

import math
from collections.abc import Hashable

MAX_KEYS = 10_000  # past this many buckets, the full ones (idle keys) are dropped


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is."""
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.at) * self.rate >= self.burst


class RateLimiter:
    """One bucket per key (a user, an address...), created full on first use."""

    def __init__(self, *, rate: float, burst: float, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[Hashable, TokenBucket] = {}

    def take(self, key: Hashable, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_full(now)
            bucket = self._buckets[key] = TokenBucket(rate=self.rate, burst=self.burst, now=now)
        return bucket.take(now)

    def _forget_full(self, now: float) -> None:
        """A full bucket is the same as no bucket: dropping it changes no answer."""
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(seconds: float) -> str:
    """`Retry-After` is whole seconds; round up so a client that waits that long gets in."""
    return str(max(1, math.ceil(seconds)))
