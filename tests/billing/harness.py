"""Drive the real supervisor and session actors through their channels, under a fake clock.

Storage runs inline (same thread, real SQLite) so `autojump_clock` only jumps
when every task is really waiting on time.
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import trio

from actors.clock import WallClock
from actors.directory import call_session
from actors.ports import ChatCursor, ChatFrame, ConnectionRef, Outgoing, ToConnection
from actors.post_office import PostOffice
from actors.session import GetLiveBilling, JoinSession, LeaveSession, MemberAlive, SessionContext, Transition
from actors.supervise import Supervisor, SupervisorHandle
from domain.errors import StorageUnavailable
from domain.identity import Identity
from domain.session import SessionRecord
from domain.settings import Settings
from domain.timeline import CREATED, TimelineEntry
from protocol import replies
from storage import messages as sm
from storage.actor import StorageActor, StorageHandle
from storage.sqlite_backend import SqliteBackend

EPOCH_MS = 1_800_000_000_000
_ids = itertools.count(1)


class FlakyBackend(SqliteBackend):
    """Real SQLite, failing every write as the backend does on an I/O error while `failing`."""

    failing = False

    def write(self, conn: Any, request: Any) -> Any:
        if self.failing:
            raise StorageUnavailable("disk I/O error")
        return super().write(conn, request)


class Peer:
    """One user's connection, as a session actor sees it, with its outbox readable."""

    def __init__(self, user: str, *, outbox: int = 1000) -> None:
        self.send, self.outbox = trio.open_memory_channel[Outgoing](outbox)
        self.ref = ConnectionRef(id=f"c{next(_ids)}", user=user)
        self.user = user
        self.seen: list[dict[str, Any]] = []
        self.cursors: list[ChatCursor] = []
        self.overruns = 0

    def reply_to(self, ref: str) -> ToConnection:
        return ToConnection(conn=self.ref, ref=ref)

    def frames(self, type_: str | None = None) -> list[dict[str, Any]]:
        while True:
            try:
                item = self.outbox.receive_nowait()
            except trio.WouldBlock:
                break
            match item:
                case str():
                    self.seen.append(orjson.loads(item))
                case ChatFrame(text=text) if text is not None:
                    self.seen.append(orjson.loads(text))
                case ChatCursor():
                    self.cursors.append(item)
        return [f for f in self.seen if type_ is None or f["type"] == type_]

    def reply(self, ref: str) -> dict[str, Any]:
        replies = [f for f in self.frames() if f.get("ref") == ref]
        assert len(replies) == 1, replies
        return replies[0]


@dataclass
class World:
    storage: StorageHandle
    supervisor: SupervisorHandle
    supervisor_actor: Supervisor
    post_office: PostOffice
    clock: WallClock
    settings: Settings
    nursery: trio.Nursery
    _connected: set[str] = field(default_factory=set)
    _heartbeats: dict[tuple[str, str], trio.CancelScope] = field(default_factory=dict)

    async def create(self, *, payer: str = "payer", provider: str = "provider", rate: int = 60,
                     budget: int | None = None) -> str:
        session_id = uuid.uuid4().hex
        now = self.clock.now_ms()
        await self.storage.write(sm.CreateSession(
            session=SessionRecord(id=session_id, payer=payer, provider=provider, rate_per_minute=rate,
                                  currency="EUR", max_amount_minor=budget, created_at=now, created_by="admin"),
            timeline=TimelineEntry(session_id=session_id, at=now, kind=CREATED, actor="admin"),
        ))
        return session_id

    async def transition(self, session_id: str, name: str, user: str = "admin") -> dict[str, Any]:
        caller = Identity(user=user, is_admin=user == "admin")
        result = await self.call(session_id, lambda reply: Transition(caller=caller, name=name, reply=reply))
        return replies.ok_fields(result)

    async def call(self, session_id: str, make: Any) -> Any:
        return await call_session(self.supervisor, self.post_office, session_id, make)

    def connect(self, peer: Peer) -> None:
        """Give the peer an address (what a connection actor does when it starts)."""
        if peer.ref.id not in self._connected:
            self._connected.add(peer.ref.id)

            def overrun() -> None:
                peer.overruns += 1

            assert self.post_office.open_box(peer.ref, peer.send, on_overrun=overrun)

    async def create_active(self, **kwargs: Any) -> str:
        session_id = await self.create(**kwargs)
        await self.transition(session_id, "start")
        return session_id

    async def join(self, peer: Peer, session_id: str) -> dict[str, Any]:
        ref = f"j{next(_ids)}"
        self.connect(peer)
        handle = await self.supervisor.lookup(session_id)
        await handle.send(JoinSession(conn=peer.ref, reply=peer.reply_to(ref)))
        key = (peer.ref.id, session_id)
        if key not in self._heartbeats:
            self._heartbeats[key] = await self.nursery.start(self._answer_pings, peer, session_id)
        await self.settle()
        return peer.reply(ref)

    async def leave(self, peer: Peer, session_id: str, *, reason: str = "closed",
                    last_alive_ms: int | None = None) -> None:
        self.stop_answering(peer, session_id)
        handle = await self.supervisor.lookup(session_id)
        await handle.send(LeaveSession(conn=peer.ref, reason=reason, last_alive_ms=last_alive_ms))
        await self.settle()

    async def _answer_pings(self, peer: Peer, session_id: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """What a live connection does: after each pong, tell the session when it was alive."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                await trio.sleep(self.settings.heartbeat)
                handle = await self.supervisor.lookup(session_id)
                handle.send_nowait(MemberAlive(conn=peer.ref, at_ms=self.clock.now_ms()))

    def stop_answering(self, peer: Peer, session_id: str) -> None:
        """The peer goes silent (a pulled cable): no more signs of life reach the session."""
        scope = self._heartbeats.pop((peer.ref.id, session_id), None)
        if scope is not None:
            scope.cancel()

    async def live_billing(self, session_id: str) -> sm.BillingState:
        admin = Identity(user="admin", is_admin=True)
        return await self.call(session_id, lambda reply: GetLiveBilling(caller=admin, reply=reply))

    async def stored_billing(self, session_id: str) -> sm.BillingState:
        return await self.storage.read(sm.GetBilling(session_id=session_id))

    async def session(self, session_id: str) -> SessionRecord:
        return await self.storage.read(sm.GetSession(session_id=session_id))

    async def timeline(self, session_id: str) -> list[TimelineEntry]:
        return list(await self.storage.read(sm.GetTimeline(session_id=session_id)))

    async def settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def world(
    path: str = ":memory:", *, epoch_ms: int = EPOCH_MS, backend: SqliteBackend | None = None, **overrides: Any
) -> AsyncIterator[World]:
    settings = replace(Settings(billing_tick=5.0, orphan_timeout=120.0, heartbeat=1.0), **overrides)
    clock = WallClock(epoch_ms=epoch_ms)
    async with trio.open_nursery() as nursery:
        storage = await nursery.start(StorageActor(backend or SqliteBackend(path, synchronous="OFF"), inline=True).run)
        active = await storage.write(sm.ReconcileAfterRestart(now=clock.now_ms()))
        post_office = PostOffice(max_connections_per_user=settings.max_connections_per_user)
        supervisor = Supervisor(
            SessionContext(storage=storage, settings=settings, clock=clock, delivery=post_office), calls=post_office
        )
        handle = await nursery.start(functools.partial(supervisor.run, resume=active))
        yield World(storage=storage, supervisor=handle, supervisor_actor=supervisor, post_office=post_office,
                    clock=clock, settings=settings, nursery=nursery)
        nursery.cancel_scope.cancel()
