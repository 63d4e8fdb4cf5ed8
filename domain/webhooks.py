"""Webhooks, sans-IO (PRODUCT.md section 11): event names and bodies, Standard Webhooks
signatures, the retry schedule and which addresses an endpoint may point at.

Everything here is a pure function of its arguments; the outbox (storage/webhooks_sql.py)
builds the bodies, the delivery actor (actors/webhooks.py) signs and schedules them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import random
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from .clock import iso
from .session import SessionRecord

SESSION_CREATED = "session.created"
SESSION_STARTED = "session.started"
SESSION_ENDED = "session.ended"
SESSION_CANCELLED = "session.cancelled"
BILLING_LIMIT_NEAR = "billing.limit_near"
PARTICIPANT_JOINED = "participant.joined"
PARTICIPANT_LEFT = "participant.left"
PARTICIPANT_DROPPED = "participant.dropped"
EVENT_TYPES = (
    SESSION_CREATED,
    SESSION_STARTED,
    SESSION_ENDED,
    SESSION_CANCELLED,
    BILLING_LIMIT_NEAR,
    PARTICIPANT_JOINED,
    PARTICIPANT_LEFT,
    PARTICIPANT_DROPPED,
)

# delivery states
PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"  # gave up (after RETRY_FOR) or the endpoint answered 410

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
PREVIOUS_SECRET_GRACE_MS = 24 * 3600 * 1000  # a rotated-out secret keeps signing this long

# retry schedule: BASE·2^(n-1) after the n-th failed attempt, capped, times a jitter factor in
# [1 - JITTER, 1 + JITTER]; a delivery is given up only once RETRY_FOR has passed since its
# event, so jitter can never shorten the retry period below it
RETRY_BASE_S = 5.0
RETRY_CAP_S = 3600.0
RETRY_JITTER = 0.2
RETRY_FOR_MS = 24 * 3600 * 1000
REQUEST_TIMEOUT_S = 10.0


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    return base64.b64decode(raw + "==")


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64 HMAC-SHA256>` of `id.timestamp.body` (Standard Webhooks)."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_: tuple[str, ...], msg_id: str, timestamp: int, body: bytes) -> str:
    """Every signing secret's signature, space-separated (a receiver accepts any one)."""
    return " ".join(signature(s, msg_id, timestamp, body) for s in secrets_)


def retry_delay_s(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1, 2, ...)."""
    base = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** max(0, attempts - 1))
    jitter = (rng or random).uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
    return base * jitter


def gives_up(event_at_ms: int, now_ms: int) -> bool:
    return now_ms - event_at_ms >= RETRY_FOR_MS


def address_allowed(address: str) -> bool:
    """True for a public (globally routable) address: loopback, private, link-local,
    cloud metadata (169.254.169.254, fd00:ec2::254), CGNAT, multicast, reserved are not."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    id: str
    url: str
    description: str = ""
    events: tuple[str, ...]
    secret: str
    previous_secret: str | None = None
    previous_secret_until: int | None = None  # epoch ms
    enabled: bool = True
    disabled_reason: str | None = None
    created_at: int
    updated_at: int

    def signing_secrets(self, now_ms: int) -> tuple[str, ...]:
        if self.previous_secret and self.previous_secret_until and now_ms < self.previous_secret_until:
            return (self.secret, self.previous_secret)
        return (self.secret,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One event for one endpoint, as the delivery log shows it."""

    id: int
    endpoint_id: str
    event_id: str  # the `webhook-id`: the same across retries
    event_type: str
    session_id: str
    status: str
    attempts: int
    next_attempt_at: int | None
    last_attempt_at: int | None
    last_status: int | None
    last_error: str | None
    delivered_at: int | None
    created_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DueDelivery:
    """What the delivery actor needs to send one delivery now."""

    id: int
    endpoint_id: str
    url: str
    secrets: tuple[str, ...]
    event_id: str
    session_id: str
    body: bytes
    attempts: int
    created_at: int
    due_at: int = 0  # its next_attempt_at as read: the claim compares against it


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """An event the outbox writes: `body` is what every endpoint receives, byte for byte."""

    id: str
    type: str
    session_id: str
    at: int
    body: bytes


def new_event_id() -> str:
    return "msg_" + secrets.token_hex(12)


def event(type_: str, session_id: str, at_ms: int, data: dict[str, Any]) -> Event:
    body = orjson.dumps({"type": type_, "timestamp": iso(at_ms), "data": data})
    return Event(id=new_event_id(), type=type_, session_id=session_id, at=at_ms, body=body)


def session_data(session: SessionRecord) -> dict[str, Any]:
    """The session object, in the same shape as the REST API returns it."""
    return {
        "id": session.id,
        "payer": session.payer,
        "provider": session.provider,
        "guests": list(session.guests),
        "rate_per_minute": session.rate_per_minute,
        "currency": session.currency,
        "max_amount_minor": session.max_amount_minor,
        "state": session.state,
        "created_at": iso(session.created_at),
        "started_at": iso(session.started_at),
        "ended_at": iso(session.ended_at),
        "end_reason": session.end_reason,
        "metadata": session.metadata,
    }
