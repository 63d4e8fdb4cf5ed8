"""The connection actor: one per WebSocket.

Tasks, all in the connection's own nursery (whichever ends first ends them all):
- the reader owns the protocol: it decodes frames, answers what it can itself
  (`ping`, `chat.history`, errors) and passes the rest to session actors,
  *awaiting* space in their mailboxes, so a flooding client is pushed back by TCP;
- the writer is the only task that sends on the socket; everything else puts
  encoded frames into the bounded outbox with `send_nowait`. A full outbox marks
  the connection a slow consumer and it is closed with 1008, never buffered;
- the heartbeat pings every `heartbeat` seconds and closes a connection that has
  sent neither a frame nor a pong for two intervals.

When it ends, for any reason, it tells every session it joined that its user
left, with the last instant it was known alive, so billing stops there.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from domain import metrics
from domain.clock import WallClock
from domain.errors import Forbidden, NotJoined, ParleyError, RateLimited, Unauthorized
from domain.identity import Identity
from domain.ratelimit import TokenBucket
from domain.settings import Settings
from protocol import wire
from storage import messages as sm
from storage.actor import StorageHandle

from .call_session import (
    DeleteChat,
    EditChat,
    FrameReply,
    JoinSession,
    LeaveSession,
    RaiseReceipt,
    RelaySignal,
    SendChat,
    SessionGone,
    SessionHandle,
    SetTyping,
    Transition,
)
from .supervise import SupervisorHandle

log = logging.getLogger("parley.connection")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_SLOW_CONSUMER = 1008
CLOSE_INTERNAL = 1011
CLOSE_AUTH = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_POLICY = 4008
LEAVE_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0
RATE_LIMIT_STRIKES = 100  # rejected frames in a row before the connection is closed
PACED_SHARE = 2  # paced sends (the offline queue) fill at most 1/PACED_SHARE of the outbox


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionContext:
    """What every connection actor needs from the process."""

    settings: Settings
    storage: StorageHandle
    supervisor: SupervisorHandle
    clock: WallClock
    authenticate: Callable[[str], Identity]  # raises Unauthorized
    shutting_down: trio.Event


class ConnectionHandle:
    """What session actors hold of a connection: who it is and a non-blocking send."""

    __slots__ = ("id", "user", "is_admin", "_outbox", "_room", "on_slow")

    def __init__(self, *, id: str, user: str, is_admin: bool, outbox: trio.MemorySendChannel[str]) -> None:
        self.id = id
        self.user = user
        self.is_admin = is_admin
        self._outbox = outbox
        self._room = trio.Event()  # set by the writer whenever it takes a frame (or stops)
        self.on_slow: Callable[[], None] = lambda: None  # set by the connection actor

    def send_nowait(self, frame: str) -> None:
        """Queue a frame; a full outbox marks this connection a slow consumer."""
        try:
            self._outbox.send_nowait(frame)
        except trio.WouldBlock:
            self.close_slow_consumer()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def send(self, frame: str, *, timeout: float) -> bool:
        """Queue a frame, waiting up to `timeout` for room (the offline queue's pace).

        It leaves most of the outbox free: while a backlog is paced through, live frames
        (typing, presence, billing, receipts) still go in with `send_nowait` without
        finding the outbox full and closing the connection as a slow consumer.
        """
        with trio.move_on_after(timeout):
            while True:
                stats = self._outbox.statistics()
                if stats.open_receive_channels == 0:
                    return False
                if stats.current_buffer_used < max(1, stats.max_buffer_size // PACED_SHARE):
                    try:
                        self._outbox.send_nowait(frame)
                        return True
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return False
                    except trio.WouldBlock:
                        pass
                self._room = trio.Event()
                await self._room.wait()
        self.close_slow_consumer()
        return False

    def frame_taken(self) -> None:
        """The writer took a frame from the outbox (or stopped): wake a paced `send`."""
        self._room.set()

    def close_slow_consumer(self) -> None:
        """Synchronous, so session actors can call it: the connection closes itself (1008)."""
        self.on_slow()

    def __repr__(self) -> str:
        return f"<connection {self.id} of {self.user}>"


class _Finished(Exception):
    """Raised inside the connection's nursery to end it with a close code."""

    def __init__(self, code: int, reason: str, *, dropped: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.dropped = dropped


def _first_leaf(group: BaseExceptionGroup) -> Any:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def serve(ws: WebSocketConnection, ctx: ConnectionContext, *, query_token: str | None) -> None:
    """Run one connection from hello to close. Never raises for anything the client did."""
    metrics.CONNECTIONS.inc()
    try:
        conn_id = secrets.token_hex(8)
        identity = await _hello(ws, ctx, query_token, conn_id)
        if identity is None:
            return
        if not await ctx.supervisor.register_connection(identity.user):
            metrics.ERRORS.labels("rate_limited").inc()
            await _close(ws, CLOSE_POLICY, "too many connections for this user")
            return
        try:
            await Connection(ws, identity, ctx, conn_id).run()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_TIMEOUT):
                await ctx.supervisor.unregister_connection(identity.user)
    finally:
        metrics.CONNECTIONS.dec()


async def _close(ws: WebSocketConnection, code: int, reason: str) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(code, reason)


async def _hello(
    ws: WebSocketConnection, ctx: ConnectionContext, query_token: str | None, conn_id: str
) -> Identity | None:
    """Authenticate (query token or a `hello` within `hello_timeout`) and send `welcome`."""
    token = query_token
    try:
        if token is None:
            with trio.move_on_after(ctx.settings.hello_timeout):
                text = await ws.get_message()
                request = wire.decode_request(text)
                if not isinstance(request, wire.Hello):
                    raise Unauthorized("the first frame must be hello")
                token = request.token
            if token is None:
                await _close(ws, CLOSE_AUTH, "no hello in time")
                return None
        identity = ctx.authenticate(token)
    except (wire.FrameError, Unauthorized) as exc:
        message = exc.error.message if isinstance(exc, wire.FrameError) else exc.message
        metrics.ERRORS.labels("unauthorized").inc()
        await _close(ws, CLOSE_AUTH, f"unauthorized: {message}"[:120])
        return None
    except ConnectionClosed:
        return None
    try:
        await ws.send_message(wire.event(
            "welcome", user=identity.user, connection=conn_id, heartbeat=ctx.settings.heartbeat,
        ))
    except ConnectionClosed:
        return None
    return identity


class Connection:
    def __init__(self, ws: WebSocketConnection, identity: Identity, ctx: ConnectionContext, conn_id: str) -> None:
        self.ws = ws
        self.ctx = ctx
        self.settings = ctx.settings
        self.caller = identity
        outbox_send, self._outbox = trio.open_memory_channel[str](ctx.settings.outbox_frames)
        self.handle = ConnectionHandle(
            id=conn_id, user=identity.user, is_admin=identity.is_admin, outbox=outbox_send,
        )
        self.joined: dict[str, SessionHandle] = {}  # a cache: the session actors hold the truth
        self.last_alive = trio.current_time()
        self._bucket = TokenBucket(
            rate=ctx.settings.frames_per_second, burst=ctx.settings.frame_burst, now=trio.current_time()
        )
        self._strikes = 0
        self._scope: trio.CancelScope | None = None
        self._finished: _Finished | None = None  # set when something outside the tasks ends it
        self.handle.on_slow = self._slow_consumer

    def _slow_consumer(self) -> None:
        if self._finished is None:
            self._finished = _Finished(CLOSE_SLOW_CONSUMER, "slow consumer")
        if self._scope is not None:
            self._scope.cancel()

    # ------------------------------------------------------------ lifetime

    async def run(self) -> None:
        finished = _Finished(CLOSE_NORMAL, "closed")
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self._finished is not None:  # a slow consumer before it even started
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._writer)
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._watch, self.ctx.shutting_down.wait, CLOSE_GOING_AWAY, "server shutting down")
                await self._reader()
                nursery.cancel_scope.cancel()
            if self._finished is not None:
                finished = self._finished
        except* _Finished as group:
            finished = self._finished or _first_leaf(group)
        except* Exception:
            log.exception("connection %s of %s crashed", self.handle.id, self.caller.user)
            finished = _Finished(CLOSE_INTERNAL, "internal error")
        finally:
            await self._leave_all(finished)
            self._outbox.close()
            self.handle.frame_taken()
            if finished.code != CLOSE_NORMAL or not self.ws.closed:
                if finished.code == CLOSE_SLOW_CONSUMER:
                    metrics.SLOW_CONSUMERS.inc()
                await _close(self.ws, finished.code, finished.reason)

    async def _leave_all(self, finished: _Finished) -> None:
        last_alive_ms = self.ctx.clock.to_wall_ms(self.last_alive) if finished.dropped else None
        reason = "dropped" if finished.dropped else "closed"
        with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_TIMEOUT):
            for handle in self.joined.values():
                try:
                    await handle.send(LeaveSession(
                        conn_id=self.handle.id, user=self.caller.user, reason=reason, last_alive_ms=last_alive_ms,
                    ))
                except SessionGone:
                    pass

    async def _watch(self, wait: Callable[[], Any], code: int, reason: str) -> None:
        await wait()
        raise _Finished(code, reason)

    async def _writer(self) -> None:
        async for frame in self._outbox:
            self.handle.frame_taken()
            try:
                await self.ws.send_message(frame)
            except ConnectionClosed:
                raise _Finished(CLOSE_NORMAL, "send failed", dropped=True) from None
            metrics.FRAMES_OUT.inc()

    async def _heartbeat(self) -> None:
        """Ping every `heartbeat` seconds; end a connection silent (no frame, no pong) for two.

        One task and one timer per connection: idle connections are mostly this loop.
        """
        interval = self.settings.heartbeat
        while True:
            with trio.move_on_at(self.last_alive + 2 * interval):
                await trio.sleep(interval)
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return  # the reader sees the close and ends the connection
                self.last_alive = trio.current_time()
                continue
            if trio.current_time() >= self.last_alive + 2 * interval:  # frames may have come
                raise _Finished(CLOSE_POLICY, "heartbeat timeout", dropped=True)

    # ------------------------------------------------------------ reading

    async def _reader(self) -> None:
        while True:
            try:
                text = await self.ws.get_message()
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason else None
                if code == 1009:
                    metrics.ERRORS.labels("too_large").inc()
                # 1006: the TCP connection died without a close frame
                raise _Finished(CLOSE_NORMAL, "closed by client", dropped=code == 1006) from None
            self.last_alive = trio.current_time()
            metrics.FRAMES_IN.inc()
            if not self._take_token():
                self._strikes += 1
                if self._strikes > RATE_LIMIT_STRIKES:
                    raise _Finished(CLOSE_POLICY, "rate limit exceeded")
                self._fail(wire._ref_of(text), RateLimited("too many frames; slow down"))
                continue
            self._strikes = 0
            try:
                request = wire.decode_request(text)
            except wire.FrameError as exc:
                self._fail(exc.ref, exc.error)
                continue
            try:
                await self._dispatch(request)
            except ParleyError as exc:
                self._fail(request.ref, exc)
            except trio.TooSlowError:
                self._fail(request.ref, ParleyError("the server is overloaded; try again"))

    def _take_token(self) -> bool:
        return self._bucket.take(trio.current_time()) == 0.0

    def _fail(self, ref: str | None, error: ParleyError) -> None:
        metrics.ERRORS.labels(error.code).inc()
        self.handle.send_nowait(wire.error(ref, error.code, error.message, **error.extra))

    def _reply(self, ref: str | None) -> FrameReply:
        return FrameReply(self.handle, ref)

    async def _dispatch(self, request: wire.Request) -> None:
        reply = self._reply(request.ref)
        match request:
            case wire.Ping(ref=ref):
                self.handle.send_nowait(wire.ok(ref) if ref is not None else wire.event("pong"))
            case wire.Hello():
                raise Forbidden("already authenticated")
            case wire.Join(session=session_id):
                await self._join(session_id, reply)
            case wire.Leave(session=session_id):
                handle = self.joined.pop(session_id, None)
                if handle is None:
                    raise NotJoined("not joined to this session")
                await self._to_session(session_id, handle, LeaveSession(
                    conn_id=self.handle.id, user=self.caller.user, reason="left", reply=reply,
                ))
            case wire.Signal(session=session_id, to=to, kind=kind, payload=payload):
                await self._to_joined(session_id, RelaySignal(
                    conn=self.handle, to=to, kind=kind, payload=bytes(payload), reply=reply,
                ))
            case wire.ChatSend(session=session_id, client_id=client_id, body=body):
                await self._to_joined(session_id, SendChat(
                    caller=self.caller, conn_id=self.handle.id, client_id=client_id, body=body, reply=reply,
                ))
            case wire.ChatReceipt(session=session_id, kind=kind, seq=seq):
                await self._to_joined(session_id, RaiseReceipt(conn=self.handle, kind=kind, seq=seq, reply=reply))
            case wire.Typing(session=session_id, active=active):
                await self._to_joined(session_id, SetTyping(conn=self.handle, active=active, reply=reply))
            case wire.ChatEdit(session=session_id, id=message_id, body=body):
                await self._to_any(
                    session_id, EditChat(caller=self.caller, message_id=message_id, body=body, reply=reply)
                )
            case wire.ChatDelete(session=session_id, id=message_id):
                await self._to_any(session_id, DeleteChat(caller=self.caller, message_id=message_id, reply=reply))
            case wire.SessionEnd(session=session_id):
                await self._to_any(session_id, Transition(caller=self.caller, name="end", reply=reply))
            case wire.ChatHistory():
                await self._history(request, reply)

    async def _join(self, session_id: str, reply: FrameReply) -> None:
        for _ in range(3):
            handle = await self.ctx.supervisor.session(session_id)
            try:
                await handle.send(JoinSession(conn=self.handle, reply=reply))
            except SessionGone:
                continue
            self.joined[session_id] = handle
            return
        raise ParleyError("the session is restarting; try again")

    async def _to_session(self, session_id: str, handle: SessionHandle, message: Any) -> None:
        try:
            await handle.send(message)
        except SessionGone:
            self.joined.pop(session_id, None)
            raise NotJoined("not joined to this session (it was restarted)") from None

    async def _to_joined(self, session_id: str, message: Any) -> None:
        handle = self.joined.get(session_id)
        if handle is None:
            raise NotJoined("join the session first")
        await self._to_session(session_id, handle, message)

    async def _to_any(self, session_id: str, message: Any) -> None:
        """Requests that need a participant, not a joined connection."""
        handle = self.joined.get(session_id) or await self.ctx.supervisor.session(session_id)
        try:
            await handle.send(message)
        except SessionGone:
            self.joined.pop(session_id, None)
            await (await self.ctx.supervisor.session(session_id)).send(message)

    async def _history(self, request: wire.ChatHistory, reply: FrameReply) -> None:
        session = await self.ctx.storage.read(sm.GetSession(session_id=request.session))
        if not (self.caller.is_admin or session.is_participant(self.caller.user)):
            raise Forbidden("not a participant of this session")
        page = await self.ctx.storage.read(sm.GetMessages(
            session_id=request.session, after_seq=request.after_seq, before_seq=request.before_seq,
            limit=request.limit,
        ))
        reply.ok(session=request.session, messages=[wire.record(m) for m in page])
