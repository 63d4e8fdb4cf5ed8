"""The connection actor: one per WebSocket.

Tasks: the reader is the task that runs the connection (`Connection.run`); a writer,
while there is one, runs in the socket's nursery (the listener's, per connection) under
its own cancel scope, which ending the connection cancels:
- the reader owns the protocol: it decodes frames, answers what it can itself
  (`ping`, `chat.history`, errors) and passes the rest to session actors,
  *awaiting* space in their mailboxes, so a flooding client is pushed back by TCP;
- writes: every item for the connection (sessions' through the `Delivery` port,
  its own replies too) is offered to `_take`, which never waits. While no writer
  task runs, nothing is queued, so a plain frame, or a chat message next in `seq`,
  is written at once by the delivering task (one non-blocking write); anything
  else goes into the bounded outbox, and a writer task is started, which owns
  every write from then until it has emptied the outbox, and then ends. So an
  idle connection has no writer task. A full outbox makes this a slow consumer,
  closed with 1008, never buffered. The writer also streams each joined
  session's offline queue from storage and keeps chat gapless by `seq`
  (actors/offline_queue.py);
- no task of its own for liveness: the process's heartbeat wheel (actors/heartbeat.py)
  pings it when it has been silent for a `heartbeat` interval, closes it (4008) when
  it has sent neither a frame nor a pong for two. Billing never checkpoints past the
  instant it was last known alive: a session in this process reads that instant from
  the connection through the post office (`_alive_ms`); sessions held through the
  cluster hear it as `MemberAlive`, after every pong and at least once an interval.
  The wheel is also what a graceful shutdown walks (1001).

When it ends, for any reason, it tells every session it joined that its user
left, with the last instant it was known alive, so billing stops there.
"""

from __future__ import annotations

import collections
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from domain import audit, metrics
from domain.errors import Forbidden, NotJoined, ParleyError, RateLimited, StorageUnavailable, Unauthorized
from domain.identity import Identity
from domain.ratelimit import TokenBucket
from domain.settings import Settings
from protocol import replies, wire
from storage import messages as sm
from storage.actor import StorageHandle

from .clock import WallClock
from .directory import SessionDirectory, send_to_session
from .heartbeat import Beat, HeartbeatWheel
from .offline_queue import OfflineQueue
from .ports import ChatCursor, ChatFrame, ConnectionRef, Outgoing, ToConnection
from .post_office import PostOffice
from .session import (
    DeleteChat,
    EditChat,
    JoinSession,
    LeaveSession,
    MemberAlive,
    RaiseReceipt,
    RelaySignal,
    SendChat,
    SessionGone,
    SessionHandle,
    SessionMessage,
    SetTyping,
    Transition,
)

log = logging.getLogger("parley.connection")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_SLOW_CONSUMER = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
CLOSE_AUTH = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_POLICY = 4008
LEAVE_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0
RATE_LIMIT_STRIKES = 100  # rejected frames in a row before the connection is closed
WRITE_BATCH = 64  # plain frames the writer puts in one socket write


class LiveSocket(Protocol):
    """What a connection needs of its server WebSocket beyond trio-websocket's API
    (gateway/listener.py `_ServerWebSocket`): liveness, and writes without a task hop."""

    on_pong: Callable[[], None] | None

    def ping_nowait(self) -> None: ...

    def try_send_nowait(self, message: str) -> bool: ...

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` in the socket's own nursery (it lives as long as the connection)."""

    async def send_messages(self, messages: list[str]) -> None: ...


class Admission(Protocol):
    """Cluster mode: connections per user counted across nodes (actors/cluster/admission.py)."""

    async def admit(self, user: str) -> bool: ...

    async def leave(self, user: str) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionContext:
    """What every connection actor needs from the process."""

    settings: Settings
    storage: StorageHandle
    directory: SessionDirectory
    post_office: PostOffice
    clock: WallClock
    authenticate: Callable[[str], Identity]  # raises Unauthorized
    shutting_down: trio.Event
    heartbeat: HeartbeatWheel  # run by the process; connections register while they run
    admission: Admission | None = None  # cluster mode: the per-user limit across nodes


@dataclass(frozen=True, slots=True)
class _Finished:
    code: int
    reason: str
    dropped: bool = False  # the peer went silent: it leaves at its last-alive instant


async def serve(ws: WebSocketConnection, ctx: ConnectionContext, *, query_token: str | None) -> None:
    """Run one connection from hello to close. Never raises for anything the client did."""
    metrics.CONNECTIONS.inc()
    try:
        conn_id = secrets.token_hex(8)
        identity = await _hello(ws, ctx, query_token, conn_id)
        if identity is None:
            return
        ref = ConnectionRef(id=conn_id, user=identity.user, is_admin=identity.is_admin)
        await Connection(ws, ref, ctx).run()
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
                request = wire.decode_request(await ws.get_message())
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
    welcome = wire.event("welcome", user=identity.user, connection=conn_id, heartbeat=ctx.settings.heartbeat)
    live: LiveSocket = ws  # type: ignore[assignment]  # the listener's _ServerWebSocket
    if not live.try_send_nowait(welcome):  # written at once, as the writer's frames are
        try:
            await ws.send_message(welcome)
        except ConnectionClosed:
            return None
    return identity


class Connection:
    __slots__ = (
        "ws", "ref", "ctx", "settings", "caller", "_outbox", "_writer_scope", "joined", "last_alive",
        "_reported_alive", "_beat", "_bucket", "_strikes", "_scope", "_finished", "_held",
        "_writing", "_live", "_chat",
    )

    def __init__(self, ws: WebSocketConnection, ref: ConnectionRef, ctx: ConnectionContext) -> None:
        self.ws = ws
        self.ref = ref
        self.ctx = ctx
        self.settings = ctx.settings
        self.caller = ref.identity
        # items waiting for the writer, at most `outbox_frames` (a deque is made when first needed:
        # an idle connection has none); only `_take` appends, only the writer takes
        self._outbox: collections.deque[Outgoing] | None = None
        self._writer_scope: trio.CancelScope | None = None  # the running writer's (ending cancels it)
        self.joined: dict[str, SessionHandle] = {}  # a cache: the session actors hold the truth
        self.last_alive = trio.current_time()  # its last frame or pong (the reader and `_pong` set it)
        self._reported_alive = self.last_alive  # what the joined sessions last heard
        self._beat: Beat | None = None  # its entry in the heartbeat wheel, while it runs
        self._bucket = TokenBucket(
            rate=ctx.settings.frames_per_second, burst=ctx.settings.frame_burst, now=trio.current_time()
        )
        self._strikes = 0
        self._scope = trio.CancelScope()
        self._finished: _Finished | None = None
        # chat items the writer took out of the outbox while it sent the frames behind them
        # (between pages of a backlog); they go before the outbox. The writer's own, made lazily
        self._held: collections.deque[ChatFrame | ChatCursor] | None = None
        # True from the moment an item is queued until the writer task has emptied the outbox
        # and the held items, and ended; while False, `_take` may write at once (no task hop)
        self._writing = False
        self._live: LiveSocket = ws  # type: ignore[assignment]  # the listener's _ServerWebSocket
        self._chat = OfflineQueue(ctx.storage, self._send, self._send_waiting_frames)  # the writer's

    def _finish(self, code: int, reason: str, *, dropped: bool = False) -> None:
        """End the connection. The first reason names the close code; if any reason says
        the peer went silent, it leaves at its last-alive instant (never billed past it)."""
        if self._finished is None:
            self._finished = _Finished(code, reason, dropped)
        elif dropped and not self._finished.dropped:
            self._finished = _Finished(self._finished.code, self._finished.reason, True)
        self._scope.cancel()
        if self._writer_scope is not None:
            self._writer_scope.cancel()

    def _put(self, item: Outgoing) -> None:
        """The connection's own frames go the way sessions' do: a full outbox is a slow consumer."""
        self.ctx.post_office.deliver(self.ref, item)

    # ------------------------------------------------------------ lifetime

    async def run(self) -> None:
        admission = self.ctx.admission
        if admission is not None and not await admission.admit(self.ref.user):
            metrics.ERRORS.labels("rate_limited").inc()
            await _close(self.ws, CLOSE_POLICY, "too many connections for this user")
            return
        if not self.ctx.post_office.open_box(
            self.ref, on_overrun=self._slow_consumer, take=self._take, alive=self._alive_ms,
        ):
            if admission is not None:
                await admission.leave(self.ref.user)
            metrics.ERRORS.labels("rate_limited").inc()
            await _close(self.ws, CLOSE_POLICY, "too many connections for this user")
            return
        self._live.on_pong = self._pong
        self._beat = self.ctx.heartbeat.register(self)
        if self.ctx.shutting_down.is_set():  # it came in after the wheel's shutdown walk
            self.going_away()
        try:
            with self._scope:
                await self._reader()
        except Exception:
            log.exception("connection %s of %s crashed", self.ref.id, self.ref.user)
            self._finish(CLOSE_INTERNAL, "internal error")
        finally:
            if self._writer_scope is not None:
                self._writer_scope.cancel()
            self.ctx.heartbeat.unregister(self._beat)
            self._live.on_pong = None
            self.ctx.post_office.close_box(self.ref)
            if admission is not None:
                await admission.leave(self.ref.user)  # shielded, bounded
            finished = self._finished or _Finished(CLOSE_NORMAL, "closed")
            await self._leave_all(finished)
            self._outbox = self._held = None  # what was still queued is dropped
            if finished.code != CLOSE_NORMAL or not self.ws.closed:
                if finished.code == CLOSE_SLOW_CONSUMER:
                    metrics.SLOW_CONSUMERS.inc()
                await _close(self.ws, finished.code, finished.reason)

    def _slow_consumer(self) -> None:
        self._finish(CLOSE_SLOW_CONSUMER, "slow consumer")

    async def _leave_all(self, finished: _Finished) -> None:
        last_alive_ms = self.ctx.clock.to_wall_ms(self.last_alive) if finished.dropped else None
        reason = "dropped" if finished.dropped else "closed"
        message = LeaveSession(conn=self.ref, reason=reason, last_alive_ms=last_alive_ms)
        with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_TIMEOUT):
            for handle in self.joined.values():
                try:
                    await handle.send(message)
                except SessionGone:
                    pass

    def _take(self, item: Outgoing) -> bool:
        """Every item for this connection comes here, from the post office (sync, never waits).
        False: the outbox is full, this is a slow consumer (the post office calls
        `_slow_consumer`). While no writer runs (nothing queued, nothing held, so the offline
        queue's state is settled), a plain frame, or a chat message next in `seq`, is written
        at once, from the delivering task straight to this socket (and a join's cursor with no
        backlog only moves the offline queue's next `seq`). Anything else is queued and
        a writer is started; from that instant until the writer has emptied the outbox, every
        item queues behind it, so a later frame never overtakes one queued before it."""
        if self._finished is not None:
            return True  # it is closing: nothing more goes out (what is queued is dropped)
        outbox = self._outbox
        if self._writing:
            assert outbox is not None
            if len(outbox) >= self.settings.outbox_frames:
                return False
            outbox.append(item)
            return True
        if type(item) is str:
            if self._write_now(item):
                return True
        elif type(item) is ChatFrame and self._chat.in_order(item):
            if item.text is None or self._write_now(item.text):
                self._chat.sent(item)
                return True
        elif type(item) is ChatCursor and self._chat.cursor_nowait(item):
            return True  # a join with no backlog: nothing to write
        if outbox is None:
            outbox = self._outbox = collections.deque()
        outbox.append(item)
        self._writing = True
        self._writer_scope = trio.CancelScope()
        self._live.start_soon(self._writer)
        return True

    def _write_now(self, frame: str) -> bool:
        if not self._live.try_send_nowait(frame):
            return False
        metrics.FRAMES_OUT.inc()
        return True

    async def _writer(self) -> None:
        """Started by `_take` when it queues an item; writes the held items, then the outbox,
        in order, and ends (sync, right after finding both empty) so deliverers may write again.
        It runs in the socket's nursery, not the connection's task: a crash is caught here,
        logged and ends the connection (1011), as one in the reader does."""
        scope = self._writer_scope
        assert scope is not None
        try:
            with scope:
                await self._write_queued()
        except Exception:
            log.exception("connection %s of %s: writer crashed", self.ref.id, self.ref.user)
            self._finish(CLOSE_INTERNAL, "internal error")
        finally:
            if self._writer_scope is scope:
                self._writer_scope = None

    async def _write_queued(self) -> None:
        chat = self._chat
        while True:
            held, outbox = self._held, self._outbox
            if held:
                item = held.popleft()
            elif outbox:
                item = outbox.popleft()
            else:  # nothing queued, nothing in hand: deliverers may write
                self._writing = False
                return
            try:
                match item:
                    case str():
                        await self._send_plain(item)
                    case ChatFrame():
                        await chat.frame(item)
                    case ChatCursor():
                        await chat.cursor(item)
            except (StorageUnavailable, trio.TooSlowError) as exc:
                log.warning("connection %s: offline queue stopped: %s", self.ref.id, exc)
                self._finish(CLOSE_TRY_AGAIN, "storage unavailable; reconnect")
                return

    async def _send_plain(self, first: str) -> None:
        """`first` and the plain frames queued right behind it, in one socket write (the next
        chat item stops the batch and is handled next: the order is never changed)."""
        frames = [first]
        outbox = self._outbox
        if not self._held:
            while outbox and len(frames) < WRITE_BATCH and type(outbox[0]) is str:
                frames.append(outbox.popleft())  # type: ignore[arg-type]
        try:
            await self._live.send_messages(frames)
        except ConnectionClosed:
            self._finish(CLOSE_NORMAL, "send failed", dropped=True)
            await trio.sleep_forever()  # the connection's scope is cancelled: this ends the writer
        metrics.FRAMES_OUT.inc(len(frames))

    async def _send_waiting_frames(self) -> None:
        """While a backlog streams: send the plain frames queued meanwhile; chat waits its turn."""
        while self._outbox:
            item = self._outbox.popleft()
            if isinstance(item, str):
                await self._send(item)
                continue
            held = self._held
            if held is None:
                held = self._held = collections.deque()
            if len(held) >= self.settings.outbox_frames:  # held chat counts as outbox
                self._slow_consumer()
                return
            held.append(item)

    async def _send(self, frame: str) -> None:
        try:
            await self.ws.send_message(frame)
        except ConnectionClosed:
            self._finish(CLOSE_NORMAL, "send failed", dropped=True)
            await trio.sleep_forever()  # the connection's scope is cancelled: this ends the writer
        metrics.FRAMES_OUT.inc()

    # ------------------------------------------------------------ liveness (the wheel calls these)

    def ping(self) -> None:
        self._live.ping_nowait()

    def _pong(self) -> None:
        self.last_alive = trio.current_time()
        self.report_alive()

    def _alive_ms(self) -> int:
        """Its last frame or pong in wall ms: what its sessions in this process read (through
        the post office) when they checkpoint a bill."""
        return self.ctx.clock.to_wall_ms(self.last_alive)

    def report_alive(self) -> None:
        """Sessions that cannot read its liveness (on another node) hear its last frame or
        pong, once per instant; a session in this process reads it when it needs it, so an
        idle connection's pong wakes no session."""
        if self.last_alive == self._reported_alive:
            return
        self._reported_alive = self.last_alive
        notice = None
        for handle in self.joined.values():
            if handle.reads_liveness:
                continue
            if notice is None:
                notice = MemberAlive(conn=self.ref, at_ms=self._alive_ms())
            handle.send_nowait(notice)  # a full mailbox drops it: billing only gets more careful

    def heartbeat_timeout(self) -> None:
        self._finish(CLOSE_POLICY, "heartbeat timeout", dropped=True)

    def going_away(self) -> None:
        self._finish(CLOSE_GOING_AWAY, "server shutting down")

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
                self._finish(CLOSE_NORMAL, "closed by client", dropped=code == 1006)
                return
            self.last_alive = trio.current_time()
            metrics.FRAMES_IN.inc()
            if not self._take_token():
                self._strikes += 1
                if self._strikes > RATE_LIMIT_STRIKES:
                    self._finish(CLOSE_POLICY, "rate limit exceeded")
                    return
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
                if isinstance(exc, Forbidden):
                    audit.refused(
                        who=self.ref.user, what=type(request).__name__, session=getattr(request, "session", None),
                        why=exc.message,
                    )
                self._fail(request.ref, exc)
            except trio.TooSlowError:
                self._fail(request.ref, StorageUnavailable("the server is overloaded; try again"))

    def _take_token(self) -> bool:
        return self._bucket.take(trio.current_time()) == 0.0

    def _fail(self, ref: str | None, error: ParleyError) -> None:
        metrics.ERRORS.labels(error.code).inc()
        self._put(wire.error(ref, error.code, error.message, **error.extra))

    async def _dispatch(self, request: wire.Request) -> None:
        reply = ToConnection(conn=self.ref, ref=request.ref)
        me, caller = self.ref, self.caller
        match request:
            case wire.Ping(ref=ref):
                self._put(replies.ok_frame(ref, replies.Done()) if ref is not None else wire.event("pong"))
            case wire.Hello():
                raise Forbidden("already authenticated")
            case wire.Join(session=session_id):
                self.joined[session_id] = await send_to_session(
                    self.ctx.directory, session_id, JoinSession(conn=me, reply=reply)
                )
            case wire.Leave(session=session_id):
                handle = self.joined.pop(session_id, None)
                if handle is None:
                    raise NotJoined("not joined to this session")
                await self._to_joined(session_id, LeaveSession(conn=me, reason="left", reply=reply), handle)
            case wire.Signal(session=session_id, to=to, kind=kind, payload=payload):
                if not self._relay_directly(request):
                    await self._to_joined(
                        session_id, RelaySignal(conn=me, to=to, kind=kind, payload=bytes(payload), reply=reply)
                    )
            case wire.ChatSend(session=session_id, client_id=client_id, body=body):
                await self._to_joined(session_id, SendChat(
                    caller=caller, conn_id=me.id, client_id=client_id, body=body, reply=reply,
                ))
            case wire.ChatReceipt(session=session_id, kind=kind, seq=seq):
                await self._to_joined(session_id, RaiseReceipt(conn=me, kind=kind, seq=seq, reply=reply))
            case wire.Typing(session=session_id, active=active):
                await self._to_joined(session_id, SetTyping(conn=me, active=active, reply=reply))
            case wire.ChatEdit(session=session_id, id=message_id, body=body):
                await self._to_any(session_id, EditChat(caller=caller, message_id=message_id, body=body, reply=reply))
            case wire.ChatDelete(session=session_id, id=message_id):
                await self._to_any(session_id, DeleteChat(caller=caller, message_id=message_id, reply=reply))
            case wire.SessionEnd(session=session_id):
                await self._to_any(session_id, Transition(caller=caller, name="end", reply=reply))
            case wire.ChatHistory():
                await self._history(request)

    def _relay_directly(self, request: wire.Signal) -> bool:
        """The hot path of signaling: relay by the session's routing snapshot, without a hop
        through the session actor. Only when the snapshot shows both this connection and the
        target joined here; anything else (not joined yet, an unknown peer, a peer on another
        node, a session not serving) goes the slow way, where the session decides and answers."""
        handle = self.joined.get(request.session)
        routes = None if handle is None else handle.routes
        if routes is None:
            return False
        me, target = routes.get(self.ref.user), routes.get(request.to)
        if me is None or me.id != self.ref.id or target is None or target.node is not None:
            return False
        frame = wire.signal_event(request.session, self.ref.user, request.kind, bytes(request.payload))
        self.ctx.post_office.deliver(target, frame)
        if request.ref is not None:
            self._put(replies.ok_frame(request.ref, replies.Done()))
        return True

    async def _to_joined(self, session_id: str, message: SessionMessage, handle: SessionHandle | None = None) -> None:
        """Requests of a joined connection: a restarted session has forgotten the join."""
        handle = handle or self.joined.get(session_id)
        if handle is None:
            raise NotJoined("join the session first")
        try:
            await handle.send(message)
        except SessionGone:
            self.joined.pop(session_id, None)
            raise NotJoined("not joined to this session (it was restarted)") from None

    async def _to_any(self, session_id: str, message: SessionMessage) -> None:
        """Requests that need a participant, not a joined connection."""
        handle = await send_to_session(self.ctx.directory, session_id, message, handle=self.joined.get(session_id))
        if session_id in self.joined:
            self.joined[session_id] = handle

    async def _history(self, request: wire.ChatHistory) -> None:
        session = await self.ctx.storage.read(sm.GetSession(session_id=request.session))
        if not (self.caller.is_admin or session.is_participant(self.caller.user)):
            raise Forbidden("not a participant of this session")
        page = await self.ctx.storage.read(sm.GetMessages(
            session_id=request.session, after_seq=request.after_seq, before_seq=request.before_seq,
            limit=request.limit,
        ))
        if request.ref is not None:
            self._put(wire.ok(request.ref, session=request.session, messages=[wire.record(m) for m in page]))
