"""The supervisor: owner of the registry of live session actors and of per-user connection counts.

Only its loop touches the registry; everybody else sends it messages through
`SupervisorHandle`. It never awaits a session actor: a new actor is created
synchronously and loads its state in its own task, so one slow session cannot
stall joins to the others.

Session actors are restarted only when they crash while their session is
active (billing and the orphan timer must keep running), at most
`RESTART_LIMIT` times in `RESTART_WINDOW` seconds; after that the session
waits for its next join. A crash is logged and its members get an `error`
event; the server and the other sessions go on.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any

import trio

from domain import metrics
from domain.clock import WallClock
from domain.errors import Internal, StorageUnavailable
from domain.session import ACTIVE
from domain.settings import Settings
from protocol import wire
from storage.actor import StorageHandle

from .call_session import MAILBOX_SIZE, CallSession, Flush, SessionGone, SessionHandle, SessionMessage

log = logging.getLogger("parley.supervisor")

MAILBOX = 1024
RESTART_LIMIT = 3
RESTART_WINDOW = 30.0
SESSION_CALL_RETRIES = 3


@dataclass(frozen=True, slots=True)
class _GetSession:
    session_id: str
    reply: trio.MemorySendChannel[SessionHandle]


@dataclass(frozen=True, slots=True)
class _RegisterConnection:
    user: str
    reply: trio.MemorySendChannel[bool]


@dataclass(frozen=True, slots=True)
class _UnregisterConnection:
    user: str


@dataclass(frozen=True, slots=True)
class _SessionExited:
    actor: CallSession
    crashed: bool


@dataclass(frozen=True, slots=True)
class _Snapshot:
    reply: trio.MemorySendChannel[dict[str, Any]]


_Message = _GetSession | _RegisterConnection | _UnregisterConnection | _SessionExited | _Snapshot


class SupervisorHandle:
    def __init__(self, mailbox: trio.MemorySendChannel[_Message]) -> None:
        self._mailbox = mailbox

    async def _ask(self, make: Any, *args: Any) -> Any:
        send, receive = trio.open_memory_channel[Any](1)
        with trio.fail_after(30):
            await self._mailbox.send(make(*args, send))
            return await receive.receive()

    async def session(self, session_id: str) -> SessionHandle:
        """A handle to the session's live actor, starting one if none is running."""
        return await self._ask(_GetSession, session_id)

    async def call_session(self, session_id: str, make: Any, **fields: Any) -> dict[str, Any]:
        """Ask the session actor and wait for its answer, retrying if it retired meanwhile."""
        for _ in range(SESSION_CALL_RETRIES):
            handle = await self.session(session_id)
            try:
                return await handle.call(make, **fields)
            except SessionGone:
                continue
        raise StorageUnavailable("the session actor kept restarting; try again")

    async def register_connection(self, user: str) -> bool:
        return await self._ask(_RegisterConnection, user)

    async def unregister_connection(self, user: str) -> None:
        try:
            await self._mailbox.send(_UnregisterConnection(user))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def snapshot(self) -> dict[str, Any]:
        """Counts for tests and /metrics: live sessions and connections per user."""
        return await self._ask(_Snapshot)


class Supervisor:
    def __init__(self, *, storage: StorageHandle, settings: Settings, clock: WallClock) -> None:
        self.storage = storage
        self.settings = settings
        self.clock = clock
        self._sessions: dict[str, SessionHandle] = {}
        self._actors: dict[str, CallSession] = {}
        self._connections: collections.Counter[str] = collections.Counter()
        self._crashes: dict[str, collections.deque[float]] = {}
        self._mailbox_send, self._mailbox = trio.open_memory_channel[_Message](MAILBOX)
        self._nursery: trio.Nursery | None = None

    @property
    def handle(self) -> SupervisorHandle:
        return SupervisorHandle(self._mailbox_send)

    async def run(
        self,
        *,
        resume: tuple[str, ...] = (),
        task_status: trio.TaskStatus[SupervisorHandle] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled. `resume` names active sessions to restart (after a restart)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for session_id in resume:
                self._spawn(session_id)
            task_status.started(self.handle)
            async for message in self._mailbox:
                self._handle(message)

    def _handle(self, message: _Message) -> None:
        match message:
            case _GetSession(session_id=session_id, reply=reply):
                handle = self._sessions.get(session_id)
                if handle is None or handle.retired:
                    handle = self._spawn(session_id)
                reply.send_nowait(handle)
            case _RegisterConnection(user=user, reply=reply):
                allowed = self._connections[user] < self.settings.max_connections_per_user
                if allowed:
                    self._connections[user] += 1
                reply.send_nowait(allowed)
            case _UnregisterConnection(user=user):
                self._connections[user] -= 1
                if self._connections[user] <= 0:
                    del self._connections[user]
            case _SessionExited(actor=actor, crashed=crashed):
                session_id = actor.session_id
                if self._sessions.get(session_id) is actor.handle:
                    del self._sessions[session_id]
                    del self._actors[session_id]
                    if crashed and actor.session is not None and actor.session.state == ACTIVE:
                        self._maybe_restart(session_id)
            case _Snapshot(reply=reply):
                reply.send_nowait({
                    "sessions": sorted(self._sessions),
                    "connections": dict(self._connections),
                })
            case _:
                log.warning("supervisor dropped unknown message %r", message)

    def _spawn(self, session_id: str) -> SessionHandle:
        assert self._nursery is not None
        send, receive = trio.open_memory_channel[SessionMessage](MAILBOX_SIZE)
        actor = CallSession(
            session_id=session_id, storage=self.storage, settings=self.settings, clock=self.clock,
            mailbox=receive, handle=SessionHandle(session_id, send),
        )
        self._sessions[session_id] = actor.handle
        self._actors[session_id] = actor
        self._nursery.start_soon(self._supervise_session, actor, name=f"session:{session_id}")
        return actor.handle

    def _maybe_restart(self, session_id: str) -> None:
        now = trio.current_time()
        crashes = self._crashes.setdefault(session_id, collections.deque(maxlen=RESTART_LIMIT))
        crashes.append(now)
        if len(crashes) == RESTART_LIMIT and now - crashes[0] < RESTART_WINDOW:
            log.error(
                "session %s crashed %d times in %ss; not restarting it", session_id, RESTART_LIMIT, RESTART_WINDOW
            )
            return
        log.warning("restarting session %s", session_id)
        self._spawn(session_id)

    async def _supervise_session(self, actor: CallSession) -> None:
        """Temporary-with-restart: a crash is contained here, never reaches the server."""
        crashed = False
        try:
            await actor.run()
        except Exception:
            crashed = True
            metrics.SESSION_CRASHES.inc()
            log.exception("session actor %s crashed", actor.session_id)
            actor.handle.retired = True
            frame = wire.error(
                None, "internal", "the session failed; join it again", session=actor.session_id
            )
            for member in actor.members.values():
                member.conn.send_nowait(frame)
            actor.refuse_queued_nowait(Internal("the session failed; try again"))
        finally:
            actor.handle.retired = True
            actor.mailbox.close()  # senders now get SessionGone instead of waiting forever
            try:
                self._mailbox_send.send_nowait(_SessionExited(actor, crashed))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # the registry entry is retired, so the next lookup replaces it anyway
                pass

    async def flush_sessions(self, timeout: float) -> None:
        """Wait until every live session handled what is queued (leaves from closing
        connections) and checkpointed its billing: part of graceful shutdown."""
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for handle in list(self._sessions.values()):
                    nursery.start_soon(self._flush_one, handle)

    @staticmethod
    async def _flush_one(handle: SessionHandle) -> None:
        try:
            await handle.call(Flush)
        except (SessionGone, trio.TooSlowError):
            pass
        except Exception:
            log.exception("flushing session %s failed", handle.session_id)
