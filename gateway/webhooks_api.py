"""Admin REST for webhook endpoints and their delivery log (PRODUCT.md section 11).

`register(app, services)` adds the routes; `create_app` calls it. Every route is admin
only. A signing secret leaves the server twice at most: in the answer to the POST that
created the endpoint and in the answer to a PATCH that rotated it; it is never logged.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from quart import Response, request
from quart_schema import document_response, validate_querystring, validate_request
from quart_trio import QuartTrio

from actors.connection import ConnectionContext
from actors.webhooks import check_url
from domain import webhooks as wh
from domain.clock import iso
from domain.errors import Forbidden, NotFound, Unauthorized, Unprocessable
from storage import webhook_messages as w

MAX_URL_CHARS = 2048
MAX_DESCRIPTION_CHARS = 500
MAX_PAGE = 200

EventType = Literal[
    "session.created", "session.started", "session.ended", "session.cancelled", "billing.limit_near",
    "participant.joined", "participant.left", "participant.dropped",
]
assert set(EventType.__args__) == set(wh.EVENT_TYPES)  # type: ignore[attr-defined]


class CreateWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=MAX_URL_CHARS, description="http(s) URL the events are POSTed to")
    events: list[EventType] = Field(min_length=1, max_length=len(wh.EVENT_TYPES))
    description: str = Field(default="", max_length=MAX_DESCRIPTION_CHARS)


class UpdateWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=MAX_URL_CHARS)
    events: list[EventType] | None = Field(default=None, min_length=1, max_length=len(wh.EVENT_TYPES))
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    enabled: bool | None = None
    rotate_secret: bool = Field(
        default=False, description="a new secret (answered once); the old one keeps signing beside it for 24 h"
    )


class Deleted(BaseModel):
    """204: no body."""


class Webhook(BaseModel):
    id: str
    url: str
    description: str
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    previous_secret_until: str | None = Field(description="until then every event is signed with the old secret too")
    created_at: str
    updated_at: str


class WebhookWithSecret(Webhook):
    secret: str = Field(description="whsec_…: shown only in this answer")


class WebhookList(BaseModel):
    items: list[Webhook]
    next_cursor: str | None


class Delivery(BaseModel):
    id: str
    event_id: str = Field(description="the webhook-id header: the same on every retry")
    event_type: str
    session_id: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: str | None
    last_attempt_at: str | None
    last_status: int | None
    last_error: str | None
    delivered_at: str | None
    created_at: str


class DeliveryList(BaseModel):
    items: list[Delivery]
    next_cursor: str | None


class DeliveriesQuery(BaseModel):
    cursor: str | None = None
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)


def endpoint_wire(endpoint: wh.Endpoint, *, secret: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": endpoint.id,
        "url": endpoint.url,
        "description": endpoint.description,
        "events": list(endpoint.events),
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "previous_secret_until": iso(endpoint.previous_secret_until) if endpoint.previous_secret else None,
        "created_at": iso(endpoint.created_at),
        "updated_at": iso(endpoint.updated_at),
    }
    if secret:
        body["secret"] = endpoint.secret
    return body


def delivery_wire(delivery: wh.Delivery) -> dict[str, Any]:
    return {
        "id": str(delivery.id),
        "event_id": delivery.event_id,
        "event_type": delivery.event_type,
        "session_id": delivery.session_id,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": iso(delivery.next_attempt_at) if delivery.status == wh.PENDING else None,
        "last_attempt_at": iso(delivery.last_attempt_at),
        "last_status": delivery.last_status,
        "last_error": delivery.last_error,
        "delivered_at": iso(delivery.delivered_at),
        "created_at": iso(delivery.created_at),
    }


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def _events(events: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(events))


def register(app: QuartTrio, services: ConnectionContext) -> None:
    storage = services.storage
    settings = services.settings
    allow_private = settings.dev or settings.allow_private_webhooks

    def admin_only() -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("send Authorization: Bearer <token>")
        if not services.authenticate(token.strip()).is_admin:
            raise Forbidden("only admins manage webhooks")

    @app.post("/api/webhooks")
    @validate_request(CreateWebhook)
    @document_response(WebhookWithSecret, 201)
    async def create_webhook(data: CreateWebhook) -> Response:
        """Register an endpoint (admin). The answer carries its signing `secret`, the only time it is shown."""
        admin_only()
        await check_url(data.url, allow_private=allow_private)
        now_ms = services.clock.now_ms()
        endpoint = await storage.write(w.CreateEndpoint(endpoint=wh.Endpoint(
            id="wh_" + secrets.token_hex(12), url=data.url, description=data.description, events=_events(data.events),
            secret=wh.new_secret(), created_at=now_ms, updated_at=now_ms,
        )))
        return _json(endpoint_wire(endpoint, secret=True), 201)

    @app.get("/api/webhooks")
    @document_response(WebhookList)
    async def list_webhooks() -> Response:
        """Every endpoint, oldest first (admin); secrets are not shown."""
        admin_only()
        endpoints = await storage.read(w.ListEndpoints())
        return _json({"items": [endpoint_wire(e) for e in endpoints], "next_cursor": None})

    @app.get("/api/webhooks/<endpoint_id>")
    @document_response(Webhook)
    async def get_webhook(endpoint_id: str) -> Response:
        admin_only()
        return _json(endpoint_wire(await storage.read(w.GetEndpoint(endpoint_id=endpoint_id))))

    @app.patch("/api/webhooks/<endpoint_id>")
    @validate_request(UpdateWebhook)
    @document_response(WebhookWithSecret)
    async def update_webhook(endpoint_id: str, data: UpdateWebhook) -> Response:
        """Change url, events, description or `enabled`; `rotate_secret` answers the new secret
        (the old one keeps signing beside it for 24 h)."""
        admin_only()
        if data.url is not None:
            await check_url(data.url, allow_private=allow_private)
        now_ms = services.clock.now_ms()
        endpoint = await storage.write(w.UpdateEndpoint(
            endpoint_id=endpoint_id, at=now_ms, url=data.url,
            events=None if data.events is None else _events(data.events), description=data.description,
            enabled=data.enabled, secret=wh.new_secret() if data.rotate_secret else None,
            previous_secret_until=now_ms + wh.PREVIOUS_SECRET_GRACE_MS if data.rotate_secret else None,
        ))
        return _json(endpoint_wire(endpoint, secret=data.rotate_secret))

    @app.delete("/api/webhooks/<endpoint_id>")
    @document_response(Deleted, 204)
    async def delete_webhook(endpoint_id: str) -> Response:
        """Remove the endpoint and its delivery log; 204."""
        admin_only()
        await storage.write(w.DeleteEndpoint(endpoint_id=endpoint_id))
        return Response(b"", status=204)

    @app.get("/api/webhooks/<endpoint_id>/deliveries")
    @validate_querystring(DeliveriesQuery)
    @document_response(DeliveryList)
    async def list_deliveries(endpoint_id: str, query_args: DeliveriesQuery) -> Response:
        """The endpoint's delivery log, newest first, cursor-paged."""
        admin_only()
        cursor = None
        if query_args.cursor is not None:
            if not query_args.cursor.isdigit():
                raise Unprocessable("cursor: not a cursor this server gave out")
            cursor = int(query_args.cursor)
        page, next_cursor = await storage.read(w.ListDeliveries(
            endpoint_id=endpoint_id, cursor=cursor, limit=query_args.limit,
        ))
        return _json({
            "items": [delivery_wire(d) for d in page],
            "next_cursor": None if next_cursor is None else str(next_cursor),
        })

    @app.post("/api/webhooks/<endpoint_id>/deliveries/<delivery_id>/retry")
    @document_response(Delivery)
    async def retry_delivery(endpoint_id: str, delivery_id: str) -> Response:
        """Send this delivery again now (same `webhook-id`), whatever its state."""
        admin_only()
        if not delivery_id.isdigit() or len(delivery_id) > 18:
            raise NotFound(f"no delivery {delivery_id}")
        delivery = await storage.write(w.RetryDelivery(
            endpoint_id=endpoint_id, delivery_id=int(delivery_id), at=services.clock.now_ms(),
        ))
        return _json(delivery_wire(delivery))
