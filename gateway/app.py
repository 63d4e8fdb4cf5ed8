"""The REST app (quart-trio): PRODUCT.md section 7.

Handlers authenticate, check who may see the session (storage read), then
either read storage or ask the session's actor, which owns every change to a
live session. Errors leave as `{"error": {"code", "message", ...}}`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import orjson
import trio
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from quart import Response, g, request
from quart_schema import (
    QuartSchema,
    RequestSchemaValidationError,
    document_response,
    hide,
    validate_querystring,
    validate_request,
)
from quart_schema.openapi import Info
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors.connection import ConnectionContext
from actors.directory import call_session
from actors.ports import ReplyTo
from actors.session import DeleteChat, EditChat, GetLiveBilling, SendChat, SessionMessage, Transition
from domain import metrics
from domain import session as lifecycle
from domain.billing import amount_minor
from domain.clock import iso
from domain.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ParleyError,
    StorageUnavailable,
    Unauthorized,
    Unprocessable,
)
from domain.identity import Identity
from domain.session import SessionRecord
from domain.timeline import CREATED, TimelineEntry
from protocol import replies, wire
from storage import messages as sm

from . import schemas

R = TypeVar("R")

STATIC = Path(__file__).parent / "static"
IDEMPOTENCY_KEY_CHARS = 128


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def _error(error: ParleyError) -> Response:
    metrics.ERRORS.labels(error.code).inc()
    return _json({"error": {"code": error.code, "message": error.message, **error.extra}}, error.status)


def _billing_wire(session: SessionRecord, state: sm.BillingState | replies.LiveBilling | None) -> dict:
    segments = state.segments if state else ()
    billable = sum(end - start for start, end in segments)
    return {
        "session": session.id,
        "billable_ms": billable,
        "amount_minor": amount_minor(billable, session.rate_per_minute),
        "currency": session.currency,
        "rate_per_minute": session.rate_per_minute,
        "segments": [
            {"start": iso(start), "end": iso(end), "ms": end - start} for start, end in segments
        ],
        "final": bool(state and state.final),
    }


def _session_wire(session: SessionRecord, caller: Identity, *, cluster: bool) -> dict:
    """The session object; in a cluster, admins also see which node owns it (PRODUCT.md section 10)."""
    body = wire.record(session)
    if cluster and caller.is_admin:
        body["owner_node"] = session.owner_node
    return body


def create_app(services: ConnectionContext, *, mint: Callable[..., str]) -> QuartTrio:
    settings = services.settings
    storage = services.storage

    async def ask(session_id: str, make: Callable[[ReplyTo], SessionMessage], answer: type[R]) -> R:
        """Ask the session's actor and wait for its typed answer."""
        result = await call_session(services.directory, services.post_office, session_id, make)
        assert isinstance(result, answer), result
        return result

    app = QuartTrio("parley", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    QuartSchema(
        app,
        info=Info(title="Parley", version="0.1.0", description="Signaling, chat and billing for paid calls."),
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={"bearer": {"type": "http", "scheme": "bearer", "bearer_format": "JWT"}},
        security=[{"bearer": []}],
    )

    # ------------------------------------------------------------ errors

    @app.errorhandler(ParleyError)
    async def _parley_error(error: ParleyError) -> Response:
        return _error(error)

    @app.errorhandler(trio.TooSlowError)
    async def _too_slow(timeout: trio.TooSlowError) -> Response:
        return _error(StorageUnavailable("the server is overloaded; try again"))

    @app.errorhandler(RequestSchemaValidationError)
    async def _invalid(error: RequestSchemaValidationError) -> Response:
        detail = error.validation_error
        errors = getattr(detail, "errors", None)
        if callable(errors):
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            message = f"{where}: {first.get('msg')}"
        else:
            message = str(detail)
        return _error(Unprocessable(message))

    @app.errorhandler(HTTPException)
    async def _http(error: HTTPException) -> Response:
        code = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "bad_request", 413: "too_large", 429: "rate_limited"}.get(error.code or 500, "internal")
        err = ParleyError(error.description or error.name)
        err.code, err.status = code, error.code or 500
        return _error(err)

    # ------------------------------------------------------------ auth

    def authenticated(handler: Any) -> Any:
        @wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthorized("send Authorization: Bearer <token>")
            identity = services.authenticate(token.strip())
            g.caller = identity
            return await handler(*args, **kwargs)

        return wrapper

    async def visible_session(session_id: str) -> SessionRecord:
        session = await storage.read(sm.GetSession(session_id=session_id))
        caller: Identity = g.caller
        if not (caller.is_admin or session.is_participant(caller.user)):
            raise Forbidden("not a participant of this session")
        return session

    def idempotency_key() -> str | None:
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= IDEMPOTENCY_KEY_CHARS:
            raise BadRequest(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_CHARS} characters")
        return key

    # ------------------------------------------------------------ sessions

    @app.post("/api/sessions")
    @validate_request(schemas.CreateSession)
    @document_response(schemas.Session, 201)
    @authenticated
    async def create_session(data: schemas.CreateSession) -> Response:
        """Create a session (admin). Honors `Idempotency-Key`."""
        caller: Identity = g.caller
        if not caller.is_admin:
            raise Forbidden("only admins create sessions")
        now_ms = services.clock.now_ms()
        record = SessionRecord(
            id=uuid.uuid4().hex, payer=data.payer, provider=data.provider, guests=tuple(data.guests),
            rate_per_minute=data.rate_per_minute, currency=data.currency,
            max_amount_minor=data.max_amount_minor, created_at=now_ms, metadata=data.metadata,
            created_by=caller.user,
        )
        stored, _replayed = await storage.write(sm.CreateSession(
            session=record, idempotency_key=idempotency_key(),
            timeline=TimelineEntry(session_id=record.id, at=now_ms, kind=CREATED, actor=caller.user,
                                   detail={"rate_per_minute": record.rate_per_minute, "currency": record.currency}),
        ))
        return _json(wire.record(stored), 201)

    @app.get("/api/sessions")
    @validate_querystring(schemas.ListSessionsQuery)
    @document_response(schemas.SessionList)
    @authenticated
    async def list_sessions(query_args: schemas.ListSessionsQuery) -> Response:
        """Sessions newest first: all for admins, their own for users."""
        caller: Identity = g.caller
        cursor = None
        if query_args.cursor is not None:
            if not query_args.cursor.isdigit():
                raise Unprocessable("cursor: not a cursor this server gave out")
            cursor = int(query_args.cursor)
        page, next_cursor = await storage.read(sm.ListSessions(
            user=None if caller.is_admin else caller.user, state=query_args.state, cursor=cursor,
            limit=query_args.limit,
        ))
        return _json({
            "items": [_session_wire(s, caller, cluster=bool(settings.redis_url)) for s in page],
            "next_cursor": None if next_cursor is None else str(next_cursor),
        })

    @app.get("/api/sessions/<session_id>")
    @document_response(schemas.Session)
    @authenticated
    async def get_session(session_id: str) -> Response:
        return _json(_session_wire(await visible_session(session_id), g.caller, cluster=bool(settings.redis_url)))

    async def transition(session_id: str, name: str) -> Response:
        await visible_session(session_id)
        caller: Identity = g.caller
        key = idempotency_key()
        route = f"POST /api/sessions/{session_id}/{name}"
        if key is not None:
            earlier = await storage.read(sm.GetIdempotentReply(user=caller.user, route=route, key=key))
            if earlier is not None:
                return Response(earlier[1], status=earlier[0], content_type="application/json")
        try:
            changed = await ask(
                session_id, lambda reply: Transition(caller=caller, name=name, reply=reply), replies.SessionChanged
            )
            response = _json(wire.record(changed.session))
        except Conflict as exc:
            response = _error(exc)
        if key is not None:
            await storage.write(sm.SaveIdempotentReply(
                user=caller.user, route=route, key=key, status=response.status_code,
                body=await response.get_data(),
            ))
        return response

    @app.post("/api/sessions/<session_id>/start")
    @document_response(schemas.Session)
    @authenticated
    async def start_session(session_id: str) -> Response:
        """scheduled → active (participant or admin); 409 names the current state otherwise."""
        return await transition(session_id, "start")

    @app.post("/api/sessions/<session_id>/end")
    @document_response(schemas.Session)
    @authenticated
    async def end_session(session_id: str) -> Response:
        """active → ended; billing is finalized once."""
        return await transition(session_id, "end")

    @app.post("/api/sessions/<session_id>/cancel")
    @document_response(schemas.Session)
    @authenticated
    async def cancel_session(session_id: str) -> Response:
        """scheduled → cancelled."""
        return await transition(session_id, "cancel")

    @app.get("/api/sessions/<session_id>/billing")
    @document_response(schemas.Billing)
    @authenticated
    async def get_billing(session_id: str) -> Response:
        """The bill: live while active, final once ended."""
        session = await visible_session(session_id)
        if session.state == lifecycle.ACTIVE:
            caller = g.caller
            live = await ask(session_id, lambda reply: GetLiveBilling(caller=caller, reply=reply), replies.LiveBilling)
            return _json(_billing_wire(session, live))
        state = await storage.read(sm.GetBilling(session_id=session_id))
        return _json(_billing_wire(session, state))

    @app.get("/api/sessions/<session_id>/timeline")
    @document_response(schemas.Timeline)
    @authenticated
    async def get_timeline(session_id: str) -> Response:
        """Everything that happened to the session, oldest first."""
        await visible_session(session_id)
        entries = await storage.read(sm.GetTimeline(session_id=session_id))
        return _json({"items": [wire.record(e) for e in entries]})

    # ------------------------------------------------------------ messages

    @app.get("/api/sessions/<session_id>/messages")
    @validate_querystring(schemas.MessagesQuery)
    @document_response(schemas.MessageList)
    @authenticated
    async def list_messages(session_id: str, query_args: schemas.MessagesQuery) -> Response:
        await visible_session(session_id)
        page = await storage.read(sm.GetMessages(
            session_id=session_id, after_seq=query_args.after_seq, before_seq=query_args.before_seq,
            limit=query_args.limit,
        ))
        return _json({"items": [wire.record(m) for m in page]})

    @app.post("/api/sessions/<session_id>/messages")
    @validate_request(schemas.SendMessage)
    @document_response(schemas.Message, 201)
    @authenticated
    async def post_message(session_id: str, data: schemas.SendMessage) -> Response:
        """Send as a participant; same idempotency and live delivery as `chat.send`."""
        session = await visible_session(session_id)
        caller: Identity = g.caller
        if not session.is_participant(caller.user):
            raise Forbidden("only participants may write to this session's chat")
        accepted = await ask(session_id, lambda reply: SendChat(
            caller=caller, conn_id=None, client_id=data.client_id, body=data.body, reply=reply,
        ), replies.ChatAccepted)
        # a repeat answers exactly as the first time did (201 + the original message)
        return _json({**wire.record(accepted.message), "session": session_id}, 201)

    @app.get("/api/sessions/<session_id>/messages/<message_id>")
    @document_response(schemas.Message)
    @authenticated
    async def get_message(session_id: str, message_id: str) -> Response:
        await visible_session(session_id)
        message = await storage.read(sm.GetMessage(session_id=session_id, message_id=message_id))
        return _json(wire.record(message))

    @app.patch("/api/sessions/<session_id>/messages/<message_id>")
    @validate_request(schemas.EditMessage)
    @document_response(schemas.Message)
    @authenticated
    async def edit_message(session_id: str, message_id: str, data: schemas.EditMessage) -> Response:
        """Only the sender may edit."""
        await visible_session(session_id)
        caller = g.caller
        changed = await ask(session_id, lambda reply: EditChat(
            caller=caller, message_id=message_id, body=data.body, reply=reply,
        ), replies.ChatChanged)
        return _json({**wire.record(changed.message), "session": session_id})

    @app.delete("/api/sessions/<session_id>/messages/<message_id>")
    @document_response(schemas.Message)
    @authenticated
    async def delete_message(session_id: str, message_id: str) -> Response:
        """The sender or an admin may delete; the message keeps its id and seq, loses its body."""
        await visible_session(session_id)
        caller = g.caller
        changed = await ask(
            session_id, lambda reply: DeleteChat(caller=caller, message_id=message_id, reply=reply), replies.ChatChanged
        )
        return _json({**wire.record(changed.message), "session": session_id})

    # ------------------------------------------------------------ TURN

    @app.get("/api/turn")
    @document_response(schemas.IceServers)
    @authenticated
    async def turn() -> Response:
        """ICE servers; with a TURN secret, credentials in the coturn REST-API scheme."""
        servers: list[dict[str, Any]] = []
        if settings.stun_urls:
            servers.append({"urls": list(settings.stun_urls)})
        if settings.turn_secret and settings.turn_urls:
            expiry = int(time.time()) + settings.turn_ttl
            username = f"{expiry}:{g.caller.user}"
            digest = hmac.new(settings.turn_secret.encode(), username.encode(), hashlib.sha1).digest()
            servers.append({
                "urls": list(settings.turn_urls), "username": username,
                "credential": base64.b64encode(digest).decode(),
            })
            return _json({"ice_servers": servers, "ttl": settings.turn_ttl})
        return _json({"ice_servers": servers, "ttl": None})

    # ------------------------------------------------------------ operations

    @app.get("/healthz")
    @hide
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    @hide
    async def readyz() -> Response:
        if await storage.check_ready(services.clock.now_ms()):
            return _json({"status": "ready"})
        return _json({"status": "unavailable", "error": {"code": "internal", "message": "storage unavailable"}}, 503)

    @app.get("/metrics")
    @hide
    async def prometheus() -> Response:
        stats = storage.statistics()
        metrics.STORAGE_QUEUE.set(stats.queued)
        return Response(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------ demo page

    @app.get("/")
    @hide
    async def index() -> Response:
        page = STATIC / "index.html"
        if not page.exists():
            raise NotFound("the demo page is not installed")
        return Response(page.read_bytes(), content_type="text/html; charset=utf-8")

    @app.get("/static/<path:name>")
    @hide
    async def static_file(name: str) -> Response:
        path = (STATIC / name).resolve()
        if STATIC.resolve() not in path.parents or not path.is_file():
            raise NotFound("no such file")
        kinds = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
        return Response(path.read_bytes(), content_type=kinds.get(path.suffix, "application/octet-stream"))

    if settings.dev:
        @app.get("/api/dev/token")
        @document_response(schemas.DevToken)
        async def dev_token() -> Response:
            """Development mode only: a token for any user name (the demo page signs in with it)."""
            user = request.args.get("user", "")
            if not 1 <= len(user) <= 64:
                raise Unprocessable("user: 1 to 64 characters")
            admin = request.args.get("admin") in ("1", "true")
            return _json({"token": mint(user, admin=admin), "user": user, "admin": admin})

    return app
