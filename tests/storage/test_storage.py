"""The storage actor on a real SQLite file: migrations, group commit, per-request
savepoints, durability across SIGKILL, and recovery from a failing database."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from domain.errors import Conflict, NotFound, StorageUnavailable
from domain.session import SessionRecord
from domain.timeline import CREATED, TimelineEntry
from gateway.server import Running, serve
from parley_client import RequestError, connect
from storage import messages as sm
from storage.actor import StorageActor, StorageHandle
from storage.schema import SCHEMA_VERSION
from storage.sqlite_backend import migrate
from storage.sqlite_backend import SqliteBackend
from tests.conftest import SECRET, test_settings

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"meta", "sessions", "participants", "messages", "marks", "billing", "timeline", "idempotency"}


@asynccontextmanager
async def open_storage(backend: SqliteBackend, **kwargs: Any) -> AsyncIterator[tuple[StorageActor, StorageHandle]]:
    actor = StorageActor(backend, **kwargs)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(actor.run)
        yield actor, handle
        await handle.aclose()


def new_session(session_id: str | None = None, **fields: Any) -> sm.CreateSession:
    record = SessionRecord(
        id=session_id or uuid.uuid4().hex, payer="alice", provider="bob", rate_per_minute=100,
        currency="USD", created_at=1_700_000_000_000, created_by="admin", **fields,
    )
    return sm.CreateSession(
        session=record, timeline=TimelineEntry(session_id=record.id, at=record.created_at, kind=CREATED, actor="admin"),
    )


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


async def test_migrations_run_from_empty(tmp_path):
    path = tmp_path / "fresh" / "parley.sqlite3"
    assert not path.exists()
    with trio.fail_after(10):
        async with open_storage(SqliteBackend(path)):
            pass
    assert user_version(path) == SCHEMA_VERSION >= 1
    assert TABLES <= tables(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_reopening_an_existing_database_is_a_no_op(tmp_path):
    path = tmp_path / "parley.sqlite3"
    with trio.fail_after(10):
        async with open_storage(SqliteBackend(path)) as (_, storage):
            await storage.write(new_session("kept"))
        with sqlite3.connect(path) as conn:
            schema_before = sorted(conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall())
        async with open_storage(SqliteBackend(path)) as (_, storage):
            assert (await storage.read(sm.GetSession(session_id="kept"))).payer == "alice"
    with sqlite3.connect(path, isolation_level=None) as conn:
        assert migrate(conn) == SCHEMA_VERSION  # nothing left to apply
        schema_after = sorted(conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall())
    assert schema_after == schema_before
    assert user_version(path) == SCHEMA_VERSION


async def test_a_database_newer_than_the_server_is_refused(tmp_path):
    path = tmp_path / "parley.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with trio.fail_after(10), pytest.raises(ExceptionGroup) as err:
        async with open_storage(SqliteBackend(path)):
            pass
    assert err.group_contains(RuntimeError, match="newer than this server")
    assert user_version(path) == SCHEMA_VERSION + 1  # left as it was


async def test_group_commit_answers_every_writer_in_fewer_transactions(tmp_path):
    writers = 300
    results: dict[int, Any] = {}
    with trio.fail_after(30):
        async with open_storage(SqliteBackend(tmp_path / "parley.sqlite3")) as (_, storage):
            before = storage.statistics()

            async def write(i: int) -> None:
                results[i] = await storage.write(new_session(f"s{i:04}"))

            async with trio.open_nursery() as nursery:
                for i in range(writers):
                    nursery.start_soon(write, i)
            stats = storage.statistics()
            page, _ = await storage.read(sm.ListSessions(user=None, limit=200))
            total = len(page)
            while _ is not None:
                page, _ = await storage.read(sm.ListSessions(user=None, cursor=_, limit=200))
                total += len(page)
    assert sorted(results) == list(range(writers))
    assert all(record.id == f"s{i:04}" and replayed is False for i, (record, replayed) in results.items())
    assert stats.writes - before.writes == writers
    assert stats.batches - before.batches < writers
    assert stats.largest_batch > 1
    assert stats.healthy and stats.failed_batches == 0
    assert total == writers


class GatedBackend(SqliteBackend):
    """Holds the next transaction at `begin` until released, so that requests queue up
    behind it and are committed together as the following batch."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.hold = False
        self.held = threading.Event()
        self.resume = threading.Event()

    def begin(self, conn: sqlite3.Connection) -> None:
        if self.hold:
            self.hold = False
            self.held.set()
            self.resume.wait(10)
        super().begin(conn)


async def test_a_refused_request_does_not_undo_its_batch_neighbours(tmp_path):
    backend = GatedBackend(tmp_path / "parley.sqlite3")
    outcomes: dict[str, Any] = {}
    with trio.fail_after(20):
        async with open_storage(backend) as (_, storage):
            await storage.write(new_session("ended-one"))
            await storage.write(sm.TransitionSession(session_id="ended-one", name="cancel", at=1))
            backend.hold = True

            async def attempt(name: str, request: Any) -> None:
                try:
                    outcomes[name] = await storage.write(request)
                except Exception as exc:
                    outcomes[name] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt, "probe", sm.ProbeWrite(at=1))  # the held batch
                await trio.to_thread.run_sync(backend.held.wait)
                before = storage.statistics()
                nursery.start_soon(attempt, "first", new_session("first"))
                nursery.start_soon(attempt, "illegal", sm.TransitionSession(session_id="ended-one", name="start", at=2))
                nursery.start_soon(attempt, "unknown", sm.TransitionSession(session_id="nope", name="start", at=2))
                nursery.start_soon(attempt, "duplicate", new_session("ended-one"))  # same id: integrity error
                nursery.start_soon(attempt, "last", new_session("last"))
                while storage.statistics().queued < 5:
                    await trio.sleep(0.001)
                backend.resume.set()
            after = storage.statistics()
            first = await storage.read(sm.GetSession(session_id="first"))
            last = await storage.read(sm.GetSession(session_id="last"))
            ended = await storage.read(sm.GetSession(session_id="ended-one"))
            timeline = await storage.read(sm.GetTimeline(session_id="first"))
            ended_timeline = await storage.read(sm.GetTimeline(session_id="ended-one"))
    assert after.batches - before.batches == 2 and after.largest_batch >= 5  # held probe + one batch of five
    assert isinstance(outcomes["illegal"], Conflict) and outcomes["illegal"].state == "cancelled"
    assert isinstance(outcomes["unknown"], NotFound)
    assert not isinstance(outcomes["duplicate"], tuple)  # refused, not a second row
    assert outcomes["first"][0].id == "first" and outcomes["last"][0].id == "last"
    assert (first.payer, last.payer, ended.state) == ("alice", "alice", "cancelled")
    assert [e.kind for e in timeline] == ["created"]
    duplicate_timeline = [e.kind for e in ended_timeline]
    assert duplicate_timeline == ["created"]  # the refused duplicate's timeline entry was undone


WRITER = textwrap.dedent("""
    import sys, trio
    sys.path.insert(0, {root!r})
    from storage.actor import StorageActor
    from storage.sqlite_backend import SqliteBackend
    from tests.storage.test_storage import new_session

    async def main():
        actor = StorageActor(SqliteBackend({path!r}))  # synchronous=FULL, as in production
        async with trio.open_nursery() as nursery:
            storage = await nursery.start(actor.run)
            await storage.write(new_session("survivor"))
            print("acked", flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")


async def test_an_acknowledged_write_survives_sigkill(tmp_path):
    path = tmp_path / "parley.sqlite3"
    script = WRITER.format(root=str(ROOT), path=str(path))
    process = await trio.lowlevel.open_process([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        with trio.fail_after(30):
            output = b""
            while b"acked\n" not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, f"the writer exited early: {output!r}"
                output += chunk
    finally:
        process.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await process.wait()
    assert process.returncode == -signal.SIGKILL
    assert os.path.exists(str(path) + "-wal")  # it died without a clean close (no checkpoint)
    with trio.fail_after(10):
        async with open_storage(SqliteBackend(path)) as (_, storage):
            survivor = await storage.read(sm.GetSession(session_id="survivor"))
            billing = await storage.read(sm.GetBilling(session_id="survivor"))
    assert (survivor.payer, survivor.provider, survivor.state) == ("alice", "bob", "scheduled")
    assert billing is not None and billing.billable_ms == 0


class FlakyBackend(SqliteBackend):
    """Fails every write with an I/O error while `failing` is set — after doing part of
    it, so a batch that is not rolled back would leave something half-written."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.failing = False

    def write(self, conn: sqlite3.Connection, request: sm.WriteRequest) -> Any:
        result = super().write(conn, request)
        if self.failing:
            raise StorageUnavailable("disk I/O error")
        return result


async def test_a_failing_backend_gives_storage_unavailable_and_recovers(tmp_path):
    backend = FlakyBackend(tmp_path / "parley.sqlite3")
    with trio.fail_after(20):
        async with open_storage(backend) as (actor, storage):
            await storage.write(new_session("before"))
            backend.failing = True
            errors: list[Exception] = []

            async def attempt(session_id: str) -> None:
                try:
                    await storage.write(new_session(session_id))
                except StorageUnavailable as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(attempt, f"during{i}")
            assert len(errors) == 5
            assert all(e.code == "internal" and e.status == 503 for e in errors)
            assert not storage.healthy
            assert storage.statistics().failed_batches >= 1
            assert not await storage.check_ready(1)
            # reads still work, and nothing of the failed writes is there
            for i in range(5):
                with pytest.raises(NotFound):
                    await storage.read(sm.GetSession(session_id=f"during{i}"))
                assert await storage.read(sm.GetTimeline(session_id=f"during{i}")) == ()
                assert await storage.read(sm.GetBilling(session_id=f"during{i}")) is None
            backend.failing = False
            assert await storage.check_ready(2)
            assert storage.healthy
            await storage.write(new_session("after"))
            assert (await storage.read(sm.GetSession(session_id="after"))).payer == "alice"
            assert (await storage.read(sm.GetSession(session_id="before"))).payer == "alice"
    with sqlite3.connect(tmp_path / "parley.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 2
        assert conn.execute("SELECT COUNT(*) FROM participants").fetchone()[0] == 4
        assert conn.execute("SELECT COUNT(*) FROM billing").fetchone()[0] == 2


@asynccontextmanager
async def server_on(backend: SqliteBackend, tmp_path: Path) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    settings = test_settings(tmp_path)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        running = await nursery.start(lambda task_status: serve(settings, shutdown=shutdown, backend=backend, task_status=task_status))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}", timeout=15) as http:
            yield running, http
        shutdown.set()


async def test_server_degrades_while_storage_fails_and_heals_without_restart(tmp_path):
    from gateway.auth import mint_token

    def auth(user: str, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(SECRET, user, admin=admin)}"}

    body = {"payer": "alice", "provider": "bob", "guests": ["carol"], "rate_per_minute": 60, "currency": "EUR"}
    backend = FlakyBackend(tmp_path / "data" / "parley.sqlite3", synchronous="NORMAL")
    with trio.fail_after(30):
        async with server_on(backend, tmp_path) as (running, http):
            url = f"ws://127.0.0.1:{running.port}/ws"
            assert (await http.get("/readyz")).status_code == 200
            created = await http.post("/api/sessions", json=body, headers=auth("admin", True))
            session = created.json()["id"]
            async with connect(url, mint_token(SECRET, "alice")) as alice, connect(url, mint_token(SECRET, "bob")) as bob, \
                    connect(url, mint_token(SECRET, "carol")) as carol:
                await alice.request("join", session=session)
                await bob.request("join", session=session)

                backend.failing = True
                refused = await http.post("/api/sessions", json=body, headers=auth("admin", True))
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "internal"
                ready = await http.get("/readyz")
                assert ready.status_code == 503
                assert (await http.get("/healthz")).status_code == 200
                # reads go on
                assert (await http.get(f"/api/sessions/{session}", headers=auth("alice"))).status_code == 200
                # signaling between joined participants needs no storage
                await alice.request("signal", session=session, to="bob", kind="offer", payload={"sdp": "o"})
                assert (await bob.next_event("signal"))["payload"] == {"sdp": "o"}
                await bob.request("signal", session=session, to="alice", kind="answer", payload={"sdp": "a"})
                assert (await alice.next_event("signal"))["payload"] == {"sdp": "a"}
                assert (await carol.request("ping"))["type"] == "ok"
                # a join is recorded on the timeline first, so it is refused cleanly and can be retried
                with pytest.raises(RequestError) as err:
                    await carol.request("join", session=session)
                assert err.value.code == "internal"
                assert (await carol.request("ping"))["type"] == "ok"
                # a leave takes effect and is answered exactly once, even though its timeline write fails
                assert (await alice.next_event("presence"))["state"] == "joined"  # bob, earlier
                await bob.request("leave", session=session)
                left = await alice.next_event("presence")
                assert (left["user"], left["state"]) == ("bob", "left")

                backend.failing = False
                assert (await http.get("/readyz")).status_code == 200
                joined = await carol.request("join", session=session)
                assert joined["participants"] == ["alice", "carol"]
                again = await http.post("/api/sessions", json=body, headers=auth("admin", True))
                assert again.status_code == 201
                await trio.sleep(0.1)
                for client in (alice, bob, carol):
                    assert client.pending_events("error") == [], client.pending_events("error")
            listing = await http.get("/api/sessions", headers=auth("admin", True))
            assert len(listing.json()["items"]) == 2  # the refused create left nothing behind
