"""Storage requests for webhooks: endpoints, the delivery log, and what the delivery actor
reads and records. The events themselves are never requested: the outbox derives them from
the session writes (storage/webhooks_sql.py)."""

from __future__ import annotations

from dataclasses import dataclass

from domain.webhooks import Delivery, DueDelivery, Endpoint

from .messages import Read, Write

# ---------------------------------------------------------------- writes


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateEndpoint(Write[Endpoint]):
    """→ Endpoint."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateEndpoint(Write[Endpoint]):
    """→ Endpoint after the change, or NotFound. None leaves a field as it is.
    `secret` rotates: the current one becomes the previous one until `previous_secret_until`."""

    endpoint_id: str
    at: int
    url: str | None = None
    events: tuple[str, ...] | None = None
    description: str | None = None
    enabled: bool | None = None
    secret: str | None = None
    previous_secret_until: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteEndpoint(Write[None]):
    """→ None, or NotFound. Its deliveries go with it."""

    endpoint_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordAttempt(Write[None]):
    """→ None. The outcome of one POST: `status` is the delivery's state after it."""

    delivery_id: int
    at: int
    status: str  # pending (retry at next_attempt_at) | delivered | failed
    http_status: int | None
    error: str | None
    next_attempt_at: int | None
    disable_endpoint: str | None = None  # a reason: the endpoint answered 410 Gone


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimDelivery(Write[bool]):
    """→ whether this sender got it: the delivery is still pending and still due at `due_at`
    (nobody claimed it since it was read); it is then not due again before `until`. So of
    several nodes (or a look that read a stale row) exactly one sends it, and a sender that
    dies while sending leaves it due again at `until`, to be sent with the same webhook-id."""

    delivery_id: int
    due_at: int
    until: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryDelivery(Write[Delivery]):
    """→ Delivery, or NotFound: due again now, whatever its state was."""

    endpoint_id: str
    delivery_id: int
    at: int


WebhookWrite = CreateEndpoint | UpdateEndpoint | DeleteEndpoint | ClaimDelivery | RecordAttempt | RetryDelivery

# ---------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True, kw_only=True)
class ListEndpoints(Read[tuple[Endpoint, ...]]):
    """→ every endpoint, oldest first."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GetEndpoint(Read[Endpoint]):
    """→ Endpoint, or NotFound."""

    endpoint_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListDeliveries(Read[tuple[tuple[Delivery, ...], int | None]]):
    """→ (deliveries newest first, next_cursor | None). NotFound for an unknown endpoint."""

    endpoint_id: str
    cursor: int | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class DueDeliveries(Read["DueBatch"]):
    """→ DueBatch: pending deliveries of enabled endpoints due at `now`, each the oldest
    pending one of its (endpoint, session) — a failing event holds back only the later
    events of its own session — at most `per_endpoint` per endpoint and `limit` in all."""

    now: int
    limit: int
    per_endpoint: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DueBatch:
    due: tuple[DueDelivery, ...]
    next_attempt_at: int | None  # the earliest pending delivery not due yet
    oldest_pending_at: int | None  # created_at of the oldest pending delivery (enabled endpoints)


WebhookRead = ListEndpoints | GetEndpoint | ListDeliveries | DueDeliveries
