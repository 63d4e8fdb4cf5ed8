"""The supervisor: owner of the registry of live session actors (the local `SessionDirectory`).

The registry changes only in sync code, each change whole: a lookup (find, or start
the session's actor), which runs in the caller's own task without a round trip
through the loop, and the loop's handling of exit notices. Everybody else reaches it
through `SupervisorHandle`. It never awaits a session actor: a new actor is created
synchronously and loads its state in its own task, so one slow session cannot stall
lookups of the others.

Whether an actor still takes messages is the actor's own decision (it closes its
mailbox); the registry only ever reads that from the handle. Every actor's exit
reaches the loop as a `_SessionExited` notice, which its supervising task
*awaits* to send: a notice is never dropped (the loop never blocks, so the wait
is short). A session that crashes while active is restarted from storage
(billing and the orphan timer must keep running), at most `RESTART_LIMIT` times
in `RESTART_WINDOW` seconds; one more crash escalates as in OTP: the supervisor
fails with `RestartIntensityExceeded`, and with it the server, whose restart
resumes every active session from storage. A session is never left active with
no actor in a server that is still running.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from domain.errors import StorageUnavailable

from .billing_clock import BillingClock
from .post_office import PostOffice
from .session import (
    MAILBOX_SIZE,
    Flush,
    SessionActor,
    SessionContext,
    SessionCrashed,
    SessionGone,
    SessionHandle,
    SessionMessage,
)

log = logging.getLogger("parley.supervisor")

MAILBOX = 1024
RESTART_LIMIT = 3
RESTART_WINDOW = 30.0
ASK_TIMEOUT = 30.0


class RestartIntensityExceeded(Exception):
    """A session kept crashing: escalated to whoever runs the supervisor."""


@dataclass(frozen=True, slots=True)
class _SessionExited:
    session_id: str
    handle: SessionHandle
    crashed: bool
    active: bool  # the session was active when its actor stopped


@dataclass(frozen=True, slots=True)
class _Snapshot:
    reply: trio.MemorySendChannel[SupervisorSnapshot]


@dataclass(frozen=True, slots=True)
class _FlushAll:
    timeout: float
    done: trio.MemorySendChannel[None]


_Message = _SessionExited | _Snapshot | _FlushAll


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorSnapshot:
    sessions: tuple[str, ...]  # ids with a live actor, sorted


class SupervisorHandle:
    """The in-process session directory, and the supervisor's few requests.

    A lookup is the supervisor's own sync `lookup_nowait`, run in the caller's task: no
    round trip through the loop, and two callers racing for one session (the payer and
    the provider connecting together) share the actor the first one started. A handle
    that retires just after is what every holder already copes with (`SessionGone`:
    look it up again)."""

    def __init__(
        self, mailbox: trio.MemorySendChannel[_Message], lookup_nowait: Callable[[str], SessionHandle]
    ) -> None:
        self._mailbox = mailbox
        self._lookup_nowait = lookup_nowait

    async def _ask(self, make: type, *args: object) -> object:
        send, receive = trio.open_memory_channel[object](1)
        with trio.fail_after(ASK_TIMEOUT):
            await self._mailbox.send(make(*args, send))
            return await receive.receive()

    async def lookup(self, session_id: str) -> SessionHandle:
        """A handle to the session's live actor, starting one if none is running. (No
        checkpoint: the caller's next step is a send to it, which is one.)"""
        return self._lookup_nowait(session_id)

    async def snapshot(self) -> SupervisorSnapshot:
        snapshot = await self._ask(_Snapshot)
        assert isinstance(snapshot, SupervisorSnapshot)
        return snapshot

    async def flush_sessions(self, timeout: float) -> None:
        """Wait until every live session handled what is queued (leaves from closing
        connections) and checkpointed its billing: part of graceful shutdown."""
        with trio.move_on_after(timeout + 1):
            await self._ask(_FlushAll, timeout)


class Supervisor:
    def __init__(self, ctx: SessionContext, *, calls: PostOffice) -> None:
        self.ctx = ctx
        self.calls = calls
        self._sessions: dict[str, SessionHandle] = {}
        self._crashes: dict[str, collections.deque[float]] = {}
        self._mailbox_send, self._mailbox = trio.open_memory_channel[_Message](MAILBOX)
        self._nursery: trio.Nursery | None = None

    @property
    def handle(self) -> SupervisorHandle:
        return SupervisorHandle(self._mailbox_send, self.lookup_nowait)

    def lookup_nowait(self, session_id: str) -> SessionHandle:
        """The session's live actor, started if none is: sync, so nothing comes between the
        look and the start. StorageUnavailable once the supervisor is shutting down."""
        handle = self._sessions.get(session_id)
        if handle is None or handle.retired:
            if self._nursery is None or self._nursery.cancel_scope.cancel_called:
                raise StorageUnavailable("the server is shutting down; try again")
            handle = self._spawn(session_id)
        return handle

    async def run(
        self,
        *,
        resume: tuple[str, ...] = (),
        task_status: trio.TaskStatus[SupervisorHandle] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled. `resume` names active sessions to restart (after a restart).

        The session actors' billing clock is the one in the context; with none there, the
        supervisor runs one beside its actors (stopped with them)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.ctx.billing_clock is None:
                self.ctx = replace(self.ctx, billing_clock=await nursery.start(BillingClock(self.ctx.storage).run))
            for session_id in resume:
                self._spawn(session_id)
            task_status.started(self.handle)
            async for message in self._mailbox:
                self._handle(message)

    def _handle(self, message: _Message) -> None:
        match message:
            case _SessionExited(session_id=session_id, handle=handle, crashed=crashed, active=active):
                if self._sessions.get(session_id) is handle:
                    del self._sessions[session_id]
                    if crashed and active:
                        self._restart(session_id)
            case _Snapshot(reply=reply):
                reply.send_nowait(SupervisorSnapshot(sessions=tuple(sorted(self._sessions))))
            case _FlushAll(timeout=timeout, done=done):
                assert self._nursery is not None
                self._nursery.start_soon(self._flush, tuple(self._sessions.items()), timeout, done)
            case _:
                log.warning("supervisor dropped unknown message %r", message)

    def _spawn(self, session_id: str) -> SessionHandle:
        """The one way a session actor starts: fresh mailbox, fresh handle, supervised."""
        assert self._nursery is not None
        send, receive = trio.open_memory_channel[SessionMessage](MAILBOX_SIZE)
        handle = SessionHandle(session_id, send)
        actor = SessionActor(session_id=session_id, ctx=self.ctx, mailbox=receive, handle=handle)
        self._sessions[session_id] = handle
        self._nursery.start_soon(self._supervise, actor, name=f"session:{session_id}")
        return handle

    def _restart(self, session_id: str) -> None:
        now = trio.current_time()
        crashes = self._crashes.setdefault(session_id, collections.deque(maxlen=RESTART_LIMIT + 1))
        crashes.append(now)
        if len(crashes) > RESTART_LIMIT and now - crashes[0] < RESTART_WINDOW:
            log.critical(
                "session %s crashed %d times in %ss: escalating", session_id, len(crashes), RESTART_WINDOW
            )
            raise RestartIntensityExceeded(f"session {session_id} crashed {len(crashes)} times in {RESTART_WINDOW}s")
        log.warning("restarting session %s", session_id)
        self._spawn(session_id)

    async def _supervise(self, actor: SessionActor) -> None:
        """A crash is contained here (logged, reported), never raised into the nursery."""
        crashed = active = False
        try:
            await actor.run()
        except* SessionCrashed as group:
            crashed = True
            for exc in group.exceptions:
                assert isinstance(exc, SessionCrashed)
                active = active or exc.active
                log.error("session actor %s crashed", actor.session_id, exc_info=exc.__cause__ or exc)
        await self._mailbox_send.send(_SessionExited(actor.session_id, actor.handle, crashed, active))

    async def _flush(
        self, sessions: tuple[tuple[str, SessionHandle], ...], timeout: float, done: trio.MemorySendChannel[None]
    ) -> None:
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for session_id, handle in sessions:
                    nursery.start_soon(self._flush_one, session_id, handle)
        done.send_nowait(None)

    async def _flush_one(self, session_id: str, handle: SessionHandle) -> None:
        with self.calls.call() as (reply_to, answer):
            try:
                await handle.send(Flush(reply=reply_to))
            except SessionGone:
                return  # retired meanwhile: it had nothing to checkpoint
            await answer.receive()
