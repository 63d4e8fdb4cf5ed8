"""In-process harness for actor tests: a real storage actor on a tmp SQLite file, a real
supervisor, and connection actors served over in-memory WebSockets.

Storage runs inline (`StorageActor(inline=True)`): under `autojump_clock` a task waiting
on a worker thread counts as blocked, so the clock would jump to the next deadline in
the middle of a commit and fire timeouts that real time never would. SQLite itself,
the schema and every request are real.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
import trio_websocket

from actors import connection
from actors.clock import WallClock
from actors.connection import ConnectionContext
from actors.heartbeat import HeartbeatWheel
from actors.post_office import PostOffice
from actors.session import SessionContext
from actors.supervise import Supervisor, SupervisorHandle
from domain.session import SessionRecord
from domain.settings import Settings
from domain.timeline import CREATED, TimelineEntry
from gateway.auth import TokenVerifier, mint_token
from gateway.listener import _wrap_server_stream
from parley_client import Client
from storage import messages as sm
from storage.actor import StorageActor, StorageHandle
from storage.sqlite_backend import SqliteBackend

SECRET = "actor-tests-secret-which-is-long-enough-for-hs256"


def token(user: str, *, admin: bool = False, ttl: int = 3600) -> str:
    return mint_token(SECRET, user, admin=admin, ttl=ttl)


@dataclass
class ServerSide:
    """What the test can see of one served connection."""

    done: trio.Event = field(default_factory=trio.Event)
    close_codes: list[int] = field(default_factory=list)


class FreezableStream(trio.abc.Stream):
    """A client-side stream that can go dead like a pulled cable: once frozen,
    nothing more is received or sent (no pongs, no close frames)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.frozen = trio.Event()

    def freeze(self) -> None:
        self.frozen.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.frozen.is_set():
            await trio.sleep_forever()
        data = await self.inner.receive_some(max_bytes)
        if self.frozen.is_set():
            await trio.sleep_forever()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.frozen.is_set():
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Pipe:
    """One direction of a byte pipe holding at most `capacity` bytes, like a socket buffer:
    a writer blocks while it is full, and a cancelled write leaves what it wrote."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.closed = False
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(bytes(data))
        while view:
            if self.closed:
                raise trio.BrokenResourceError("the reader went away")
            room = self.capacity - len(self.buffer)
            if room <= 0:
                await self._changed.wait()
                continue
            self.buffer += view[:room]
            view = view[room:]
            self._notify()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self.buffer:
            if self.closed:
                return b""
            await self._changed.wait()
        size = len(self.buffer) if max_bytes is None else min(max_bytes, len(self.buffer))
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        self._notify()
        await trio.lowlevel.checkpoint()
        return data

    def close(self) -> None:
        self.closed = True
        self._notify()


class BoundedStream(trio.abc.Stream):
    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self.outgoing, self.incoming = outgoing, incoming

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.outgoing.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.incoming.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.outgoing.close()
        self.incoming.close()
        await trio.lowlevel.checkpoint()


def bounded_stream_pair(capacity: int = 4096) -> tuple[BoundedStream, BoundedStream]:
    """Like `memory_stream_pair`, but each direction buffers at most `capacity` bytes."""
    a_to_b, b_to_a = _Pipe(capacity), _Pipe(capacity)
    return BoundedStream(a_to_b, b_to_a), BoundedStream(b_to_a, a_to_b)


@dataclass
class World:
    settings: Settings
    storage: StorageHandle
    supervisor: SupervisorHandle
    ctx: ConnectionContext
    nursery: trio.Nursery

    async def create_session(self, payer: str = "alice", provider: str = "bob", *, guests: tuple[str, ...] = ()) -> str:
        now = self.ctx.clock.now_ms()
        record = SessionRecord(
            id=uuid.uuid4().hex, payer=payer, provider=provider, guests=guests,
            rate_per_minute=60, currency="USD", created_at=now, created_by="admin",
        )
        await self.storage.write(sm.CreateSession(
            session=record, timeline=TimelineEntry(session_id=record.id, at=now, kind=CREATED, actor="admin"),
        ))
        return record.id

    async def open_ws(
        self,
        *,
        query_token: str | None = None,
        bounded: bool = False,
        wrap: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None,
        queue: int = 10_000,
    ) -> tuple[trio_websocket.WebSocketConnection, ServerSide]:
        """A raw client WebSocket to a freshly served connection actor (no hello sent)."""
        if bounded:
            server_stream, client_stream = bounded_stream_pair()
        else:
            server_stream, client_stream = trio.testing.memory_stream_pair()
        if wrap is not None:
            client_stream = wrap(client_stream)
        side = ServerSide()

        async def serve_one() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    request = await _wrap_server_stream(  # the listener's (pongs reach the connection)
                        nursery, server_stream, max_message_size=self.settings.max_frame_bytes,
                        ping_rate=self.settings.ping_frames_per_second, ping_burst=self.settings.ping_frame_burst,
                    )
                    ws = await request.accept()
                    original = ws.aclose

                    async def recording_aclose(code: int = 1000, reason: str | None = None) -> None:
                        side.close_codes.append(code)
                        await original(code, reason)

                    ws.aclose = recording_aclose  # type: ignore[method-assign]
                    await connection.serve(ws, self.ctx, query_token=query_token)
                    nursery.cancel_scope.cancel()
            finally:
                side.done.set()
                await trio.aclose_forcefully(server_stream)

        self.nursery.start_soon(serve_one)
        ws = await trio_websocket.wrap_client_stream(
            self.nursery, client_stream, "parley.test", "/ws", message_queue_size=queue,
            max_message_size=1 << 20,
        )
        return ws, side

    async def client(self, user: str, **kwargs: Any) -> tuple[Client, trio_websocket.WebSocketConnection, ServerSide]:
        """Connect, say hello and start a `parley_client.Client` reading in the background."""
        ws, side = await self.open_ws(**kwargs)
        await ws.send_message(orjson.dumps({"type": "hello", "token": token(user)}).decode())
        welcome = orjson.loads(await ws.get_message())
        assert welcome["type"] == "welcome", welcome
        client = Client(ws)
        client.welcome = welcome
        self.nursery.start_soon(client._read)
        return client, ws, side

    async def snapshot(self) -> dict[str, Any]:
        sessions = (await self.supervisor.snapshot()).sessions
        return {"sessions": list(sessions), "connections": self.ctx.post_office.statistics().connections}


@asynccontextmanager
async def open_world(tmp_path: Path, **overrides: Any) -> AsyncIterator[World]:
    settings = replace(
        Settings(data_dir=tmp_path, secret=SECRET, sqlite_synchronous="NORMAL", heartbeat=10.0), **overrides
    )
    async with trio.open_nursery() as nursery:
        storage = await nursery.start(StorageActor(SqliteBackend(tmp_path / "parley.sqlite3", synchronous="NORMAL"), inline=True).run)
        clock = WallClock()
        post_office = PostOffice(max_connections_per_user=settings.max_connections_per_user)
        session_ctx = SessionContext(storage=storage, settings=settings, clock=clock, delivery=post_office)
        supervisor = await nursery.start(Supervisor(session_ctx, calls=post_office).run)
        heartbeat = HeartbeatWheel(settings.heartbeat)
        await nursery.start(heartbeat.run)
        ctx = ConnectionContext(
            settings=settings, storage=storage, directory=supervisor, post_office=post_office, clock=clock,
            authenticate=TokenVerifier(SECRET), shutting_down=trio.Event(), heartbeat=heartbeat,
        )
        yield World(settings=settings, storage=storage, supervisor=supervisor, ctx=ctx, nursery=nursery)
        nursery.cancel_scope.cancel()


@pytest.fixture
def world(tmp_path: Path) -> Callable[..., Any]:
    """`async with world(**settings_overrides) as w:`"""
    return lambda **overrides: open_world(tmp_path, **overrides)
