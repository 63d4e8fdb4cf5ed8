"""The REST app (quart-trio): PRODUCT.md section 7.

Handlers authenticate, check who may see the session (storage read), then
either read storage or ask the session's actor, which owns every change to a
live session. Errors leave as `{"error": {"code", "message", ...}}`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
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
from quart_schema.validation import QUART_SCHEMA_RESPONSE_ATTRIBUTE
from quart_trio import QuartTrio
from quart_trio.wrappers.request import TrioRequest
from werkzeug.exceptions import HTTPException

from actors.connection import ConnectionContext
from actors.directory import call_session
from actors.ports import ReplyTo
from actors.session import DeleteChat, EditChat, GetLiveBilling, SendChat, SessionMessage, Transition
from domain import audit, metrics
from domain import session as lifecycle
from domain.billing import amount_minor
from domain.clock import iso
from domain.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ParleyError,
    RateLimited,
    StorageUnavailable,
    Unauthorized,
    Unprocessable,
)
from domain.identity import Identity
from domain.ratelimit import RateLimiter, retry_after_header
from domain.session import SessionRecord
from domain.timeline import CREATED, TimelineEntry
from protocol import bounds, replies, wire
from storage import messages as sm

from . import schemas, webhooks_api
from .origins import origin_allowed

R = TypeVar("R")

STATIC = Path(__file__).parent / "static"
IDEMPOTENCY_KEY_CHARS = 128
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CURSOR = re.compile(r"[0-9]{1,19}")
CORS_MAX_AGE = 600


class BoundedRequest(TrioRequest):
    """Request bodies decoded by the one bounded JSON decoder (protocol/bounds.py): bytes
    in, so invalid UTF-8, deep nesting and out-of-range integers are a 400, never a 500."""

    async def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        if cache and self._cached_json[silent] is not Ellipsis:
            return self._cached_json[silent]
        if not (force or self.is_json):
            return None
        data = await self.get_data(cache=cache, as_text=False)
        try:
            result = bounds.loads(data)
        except BadRequest:
            if not silent:
                raise
            result = None
        if cache:
            self._cached_json[silent] = result
        return result


class IdempotencyGate:
    """The one owner of in-flight Idempotency-Keys in this process.

    The first request with a key runs; one arriving while it runs waits for it to end and
    then finds its stored reply (instead of running too, and getting a 409 from the
    transition the first one made). The wait is sync-checked: no checkpoint between
    finding no holder and becoming the holder.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, trio.Event] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        while (running := self._running.get(key)) is not None:
            await running.wait()
        done = self._running[key] = trio.Event()
        try:
            yield
        finally:
            del self._running[key]
            done.set()

    def __len__(self) -> int:
        return len(self._running)


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def _error(error: ParleyError) -> Response:
    metrics.ERRORS.labels(error.code).inc()
    return _json({"error": {"code": error.code, "message": error.message, **error.extra}}, error.status)


def _same_session(stored: SessionRecord, data: schemas.CreateSession) -> bool:
    """Whether a replayed create carried the same body as the one that made the session."""
    return (
        (stored.payer, stored.provider, tuple(stored.guests), stored.rate_per_minute, stored.currency,
         stored.max_amount_minor, stored.metadata)
        == (data.payer, data.provider, tuple(data.guests), data.rate_per_minute, data.currency,
            data.max_amount_minor, data.metadata)
    )


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
    app.request_class = BoundedRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    writes = RateLimiter(rate=settings.rest_writes_per_second, burst=settings.rest_write_burst)
    gate = IdempotencyGate()
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
        if isinstance(error, Unauthorized | Forbidden):
            caller = g.get("caller")
            audit.refused(
                who=caller.user if caller else None, what=f"{request.method} {request.path}",
                session=(request.view_args or {}).get("session_id"), why=error.message,
                address=request.remote_addr,
            )
        return _error(error)

    # ------------------------------------------------------------ browsers (CORS)

    @app.after_request
    async def _cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is None:
            return response
        response.vary.add("Origin")
        if not origin_allowed(origin, host=request.headers.get("Host"), allowed=settings.allowed_origins,
                              dev=settings.dev):
            return response
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, PATCH, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Idempotency-Key"
            response.headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE)
        return response

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
            if request.method in WRITE_METHODS and not identity.is_admin:
                wait = writes.take(identity.user, trio.current_time())
                if wait:
                    response = _error(RateLimited("too many writes; slow down", retry_after=round(wait, 3)))
                    response.headers["Retry-After"] = retry_after_header(wait)
                    return response
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
        stored, replayed = await storage.write(sm.CreateSession(
            session=record, idempotency_key=idempotency_key(),
            timeline=TimelineEntry(session_id=record.id, at=now_ms, kind=CREATED, actor=caller.user,
                                   detail={"rate_per_minute": record.rate_per_minute, "currency": record.currency}),
        ))
        if replayed and not _same_session(stored, data):
            raise Unprocessable("this Idempotency-Key was used with a different body", session=stored.id)
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
            if not CURSOR.fullmatch(query_args.cursor) or int(query_args.cursor) > bounds.INT_MAX:
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
        if key is None:
            return await run_transition(session_id, name, caller)
        route = f"POST /api/sessions/{session_id}/{name}"
        async with gate.hold((caller.user, route, key)):
            earlier = await storage.read(sm.GetIdempotentReply(user=caller.user, route=route, key=key))
            if earlier is not None:
                return Response(earlier[1], status=earlier[0], content_type="application/json")
            response = await run_transition(session_id, name, caller)
            await storage.write(sm.SaveIdempotentReply(
                user=caller.user, route=route, key=key, status=response.status_code,
                body=await response.get_data(),
            ))
            return response

    async def run_transition(session_id: str, name: str, caller: Identity) -> Response:
        try:
            changed = await ask(
                session_id, lambda reply: Transition(caller=caller, name=name, reply=reply), replies.SessionChanged
            )
            return _json(wire.record(changed.session))
        except Conflict as exc:
            return _error(exc)

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
    @document_response(schemas.Health)
    async def healthz() -> Response:
        """Liveness: the process answers."""
        return _json({"status": "ok"})

    @app.get("/readyz")
    @document_response(schemas.Health)
    @document_response(schemas.Health, 503)
    async def readyz() -> Response:
        """Readiness: 200 while storage reads and commits, 503 while it cannot."""
        if await storage.check_ready(services.clock.now_ms()):
            return _json({"status": "ready"})
        return _json({"status": "unavailable", "error": {"code": "internal", "message": "storage unavailable"}}, 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition (`text/plain; version=0.0.4`)."""
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

    webhooks_api.register(app, services)
    _document_errors(app)
    return app


ERROR_STATUSES = (400, 401, 403, 404, 409, 413, 422, 429, 503)


def _document_errors(app: QuartTrio) -> None:
    """Every /api route may answer the error body with these statuses: say so in /openapi.json."""
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        func = app.view_functions[rule.endpoint]
        responses = getattr(func, QUART_SCHEMA_RESPONSE_ATTRIBUTE, None)
        if responses is None:
            continue
        for status in ERROR_STATUSES:
            responses.setdefault(status, (schemas.Error, None))
