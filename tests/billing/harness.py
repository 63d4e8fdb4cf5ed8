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
from dataclasses import dataclass, replace
from typing import Any

import orjson
import trio

from actors.call_session import Caller, FrameReply, GetLiveBilling, JoinSession, LeaveSession, Transition
from actors.connection import ConnectionHandle
from actors.supervise import Supervisor, SupervisorHandle
from domain.clock import WallClock
from domain.errors import StorageUnavailable
from domain.session import SessionRecord
from domain.settings import Settings
from domain.timeline import CREATED, TimelineEntry
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
        send, self.outbox = trio.open_memory_channel[str](outbox)
        self.handle = ConnectionHandle(id=f"c{next(_ids)}", user=user, is_admin=False, outbox=send)
        self.user = user
        self.seen: list[dict[str, Any]] = []

    def frames(self, type_: str | None = None) -> list[dict[str, Any]]:
        while True:
            try:
                self.seen.append(orjson.loads(self.outbox.receive_nowait()))
            except trio.WouldBlock:
                break
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
    clock: WallClock
    settings: Settings

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
        return await self.supervisor.call_session(
            session_id, Transition, caller=Caller(user=user, is_admin=user == "admin"), name=name,
        )

    async def create_active(self, **kwargs: Any) -> str:
        session_id = await self.create(**kwargs)
        await self.transition(session_id, "start")
        return session_id

    async def join(self, peer: Peer, session_id: str) -> dict[str, Any]:
        ref = f"j{next(_ids)}"
        handle = await self.supervisor.session(session_id)
        await handle.send(JoinSession(conn=peer.handle, reply=FrameReply(peer.handle, ref)))
        await self.settle()
        return peer.reply(ref)

    async def leave(self, peer: Peer, session_id: str, *, reason: str = "closed",
                    last_alive_ms: int | None = None) -> None:
        handle = await self.supervisor.session(session_id)
        await handle.send(LeaveSession(conn_id=peer.handle.id, user=peer.user, reason=reason,
                                       last_alive_ms=last_alive_ms))
        await self.settle()

    async def live_billing(self, session_id: str) -> sm.BillingState:
        result = await self.supervisor.call_session(session_id, GetLiveBilling, caller=Caller(user="admin", is_admin=True))
        return result["billing"]

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
    settings = replace(Settings(billing_tick=5.0, orphan_timeout=120.0), **overrides)
    clock = WallClock(epoch_ms=epoch_ms)
    async with trio.open_nursery() as nursery:
        storage = await nursery.start(StorageActor(backend or SqliteBackend(path, synchronous="OFF"), inline=True).run)
        active = await storage.write(sm.ReconcileAfterRestart(now=clock.now_ms()))
        supervisor = Supervisor(storage=storage, settings=settings, clock=clock)
        handle = await nursery.start(functools.partial(supervisor.run, resume=active))
        yield World(storage=storage, supervisor=handle, supervisor_actor=supervisor, clock=clock, settings=settings)
        nursery.cancel_scope.cancel()
