"""The storage actor on a real database — each test once on a SQLite file and once on
PostgreSQL (the `store` fixture): migrations, group commit, per-request savepoints, chat
numbering, durability across SIGKILL, and recovery from a failing database."""

from __future__ import annotations

import signal
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

from domain.chat import ChatMessage, Marks
from domain.errors import BadRequest, Conflict, Internal, NotFound, StorageUnavailable
from domain.session import SessionRecord
from domain.timeline import BILLING_GAP, CREATED, TimelineEntry
from gateway.server import Running, serve
from parley_client import RequestError, connect
from storage import messages as sm
from storage.actor import Backend, StorageActor, StorageHandle
from storage.schema import SCHEMA_VERSION
from tests.conftest import SECRET, test_settings
from tests.storage.conftest import PostgresStore, SqliteStore, Store

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"meta", "sessions", "participants", "messages", "marks", "billing", "timeline", "idempotency"}


@asynccontextmanager
async def open_storage(backend: Backend, **kwargs: Any) -> AsyncIterator[tuple[StorageActor, StorageHandle]]:
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


def chat(session_id: str, client_id: str, *, sender: str = "alice", seq_hint: int = 0) -> sm.InsertMessage:
    return sm.InsertMessage(message=ChatMessage(
        id=uuid.uuid4().hex, session_id=session_id, seq=seq_hint, client_id=client_id, sender=sender,
        body=f"hello {client_id}", created_at=1_700_000_000_000,
    ))


class Wrapped:
    """A backend with some methods replaced: the rest go to the real one."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_migrations_run_from_empty(store: Store):
    with trio.fail_after(10):
        async with open_storage(store.backend()) as (_, storage):
            await storage.write(new_session("fresh"))
    assert store.version() == SCHEMA_VERSION >= 2
    assert TABLES <= store.tables()
    assert store.query("SELECT last_seq, owner_epoch FROM sessions") == [(0, 0)]


async def test_sqlite_runs_in_wal_mode(tmp_path):
    store = SqliteStore(tmp_path / "fresh" / "parley.sqlite3")
    with trio.fail_after(10):
        async with open_storage(store.backend()):
            pass
    assert store.query("PRAGMA journal_mode") == [("wal",)]


async def test_reopening_an_existing_database_is_a_no_op(store: Store):
    with trio.fail_after(10):
        async with open_storage(store.backend()) as (_, storage):
            await storage.write(new_session("kept"))
        schema_before = store.schema()
        async with open_storage(store.backend()) as (_, storage):
            assert (await storage.read(sm.GetSession(session_id="kept"))).payer == "alice"
    assert store.schema() == schema_before
    assert store.version() == SCHEMA_VERSION


async def test_a_database_newer_than_the_server_is_refused(store: Store):
    store.set_version(SCHEMA_VERSION + 1)
    with trio.fail_after(10), pytest.raises(ExceptionGroup) as err:
        async with open_storage(store.backend()):
            pass
    assert err.group_contains(RuntimeError, match="newer than this server")
    assert store.version() == SCHEMA_VERSION + 1  # left as it was


async def test_an_old_database_is_migrated_and_numbers_chat_on(store: Store):
    store.migrate_to(1)
    store.query(
        "INSERT INTO sessions (id, payer, provider, rate_per_minute, currency, state, created_at)"
        " VALUES ('old', 'alice', 'bob', 1, 'USD', 'active', 0)"
    )
    for seq in (1, 2):
        store.query(
            "INSERT INTO messages (id, session_id, seq, client_id, sender, body, created_at, deleted)"
            f" VALUES ('m{seq}', 'old', {seq}, 'c{seq}', 'alice', 'x', 0, FALSE)"
        )
    with trio.fail_after(10):
        async with open_storage(store.backend()) as (_, storage):
            third, duplicate = await storage.write(chat("old", "c3"))
            again, replayed = await storage.write(chat("old", "c1"))
    assert store.version() == SCHEMA_VERSION
    assert (third.seq, duplicate, again.seq, again.id, replayed) == (3, False, 1, "m1", True)
    assert store.query("SELECT last_seq, owner_epoch FROM sessions") == [(3, 0)]


async def test_group_commit_answers_every_writer_in_fewer_transactions(store: Store):
    writers = 300
    results: dict[int, Any] = {}
    with trio.fail_after(30):
        async with open_storage(store.backend()) as (_, storage):
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


class Gated(Wrapped):
    """Holds the next transaction at `begin` until resumed, so that requests queue up
    behind it and are committed together as the following batch."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.hold = False
        self.held = threading.Event()
        self.resume = threading.Event()

    def begin(self, conn: Any) -> None:
        if self.hold:
            self.hold = False
            self.held.set()
            self.resume.wait(10)
        self.inner.begin(conn)


async def test_a_refused_request_does_not_undo_its_batch_neighbours(store: Store):
    backend = Gated(store.backend())
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
    assert isinstance(outcomes["duplicate"], Internal)  # refused by the database, not a second row
    assert outcomes["first"][0].id == "first" and outcomes["last"][0].id == "last"
    assert (first.payer, last.payer, ended.state) == ("alice", "alice", "cancelled")
    assert [e.kind for e in timeline] == ["created"]
    duplicate_timeline = [e.kind for e in ended_timeline]
    assert duplicate_timeline == ["created"]  # the refused duplicate's timeline entry was undone


async def test_chat_is_numbered_without_gaps_by_concurrent_writers(store: Store):
    """Two storage actors on one database (two nodes, or a node and a stale one), each
    group-committing sends and resends to the same session: seq is 1..N, a resent client_id
    gets its original back and uses up no number."""
    per_writer = 60
    results: dict[str, list[tuple[ChatMessage, bool]]] = {"a": [], "b": []}
    with trio.fail_after(60):
        async with open_storage(store.backend()) as (_, one), open_storage(store.backend()) as (_, two):
            await one.write(new_session("s"))

            async def send(storage: StorageHandle, name: str) -> None:
                for n in range(0, per_writer, 6):
                    batch = [chat("s", f"{name}{i}", sender=name) for i in range(n, n + 6)]
                    batch.append(chat("s", f"{name}{n}", sender=name))  # a resend, in the same batch
                    outcomes = await storage.write_many(batch)
                    results[name].extend(o.unwrap() for o in outcomes)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, one, "a")
                nursery.start_soon(send, two, "b")
            history = await one.read(sm.GetMessages(session_id="s", limit=1000))
            last_seq, _ = await two.read(sm.GetChatState(session_id="s", user="a"))
    assert [m.seq for m in history] == list(range(1, 2 * per_writer + 1))
    assert last_seq == 2 * per_writer
    for answers in results.values():
        fresh = {m.client_id: m for m, duplicate in answers if not duplicate}
        resent = [m for m, duplicate in answers if duplicate]
        assert len(fresh) == per_writer and len(resent) == per_writer // 6
        assert all(fresh[m.client_id] == m for m in resent)  # the original id and seq
    assert store.query("SELECT last_seq FROM sessions WHERE id = 's'") == [(2 * per_writer,)]


async def test_chat_for_an_unknown_session_is_refused(store: Store):
    with trio.fail_after(10):
        async with open_storage(store.backend()) as (_, storage):
            with pytest.raises(NotFound):
                await storage.write(chat("nope", "c1"))
    assert store.count("messages") == 0


async def test_values_the_database_cannot_store_are_bad_requests(store: Store):
    """Not a crash and not a 500: an integer beyond 64 bits (stored by neither database;
    PostgreSQL compares with one), a NUL character in text (PostgreSQL cannot store one;
    SQLite can)."""
    with trio.fail_after(10):
        async with open_storage(store.backend()) as (_, storage):
            await storage.write(new_session("s"))
            huge = sm.GetMessages(session_id="s", before_seq=2**70)
            if store.kind == "postgres":
                assert await storage.read(huge) == ()  # compared as numeric
            else:
                with pytest.raises(BadRequest):
                    await storage.read(huge)
            with pytest.raises(BadRequest):
                await storage.write(sm.RaiseMark(session_id="s", user="alice", kind="read", seq=2**70))
            nul = chat("s", "nul\x00")
            if store.kind == "postgres":
                with pytest.raises(BadRequest):
                    await storage.write(nul)
                with pytest.raises(BadRequest):
                    await storage.read(sm.GetSession(session_id="s\x00"))
            else:
                assert (await storage.write(nul))[0].seq == 1
            after, _ = await storage.write(chat("s", "after"))
            assert after.seq == (1 if store.kind == "postgres" else 2)  # the refusal used up no seq
            assert storage.healthy


async def test_idempotent_create_and_reconcile_after_restart(store: Store):
    """A second start finds what the first left: the same session for the same idempotency
    key, and an open billing segment closed at its last checkpoint, once."""
    create = new_session("paid")
    create = sm.CreateSession(session=create.session, timeline=create.timeline, idempotency_key="k1")
    with trio.fail_after(20):
        async with open_storage(store.backend()) as (_, storage):
            assert (await storage.write(create))[1] is False
            await storage.write(sm.TransitionSession(session_id="paid", name="start", at=1_000))
            await storage.write(sm.CheckpointBilling(billing=sm.BillingState(
                session_id="paid", rate_per_minute=100, currency="USD", segments=((1_000, 61_000),),
                open=True, checkpoint_at=61_000,
            )))
        async with open_storage(store.backend()) as (_, storage):
            replayed, was_replayed = await storage.write(
                sm.CreateSession(session=new_session("other").session, timeline=create.timeline, idempotency_key="k1")
            )
            assert (replayed.id, was_replayed) == ("paid", True)
            assert await storage.write(sm.ReconcileAfterRestart(now=90_000)) == ("paid",)
            assert await storage.write(sm.ReconcileAfterRestart(now=95_000)) == ("paid",)
            billing = await storage.read(sm.GetBilling(session_id="paid"))
            timeline = await storage.read(sm.GetTimeline(session_id="paid"))
    assert billing is not None and (billing.open, billing.billable_ms, billing.final) == (False, 60_000, False)
    gaps = [e for e in timeline if e.kind == BILLING_GAP]
    assert [(g.detail["from"], g.detail["to"]) for g in gaps] == [(61_000, 90_000)]
    assert store.count("sessions") == 1


async def test_a_broken_connection_gives_storage_unavailable_then_reconnects(store: Store):
    """The driver's own failure (a closed SQLite handle, a terminated PostgreSQL backend)
    comes out as StorageUnavailable, and the next write and read open new connections."""
    with trio.fail_after(20):
        async with open_storage(store.backend()) as (actor, storage):
            await storage.write(new_session("before"))
            store.kill(actor._writer)
            with pytest.raises(StorageUnavailable):
                await storage.write(new_session("lost"))
            assert not storage.healthy
            await storage.write(new_session("after"))
            assert storage.healthy
            store.kill(actor._reader)
            with pytest.raises(StorageUnavailable):
                await storage.read(sm.GetSession(session_id="after"))
            assert (await storage.read(sm.GetSession(session_id="after"))).payer == "alice"
            with pytest.raises(NotFound):
                await storage.read(sm.GetSession(session_id="lost"))
    assert store.count("sessions") == 2


WRITER = textwrap.dedent("""
    import sys, trio
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from storage.actor import StorageActor
    from tests.storage.conftest import PostgresStore, SqliteStore
    from tests.storage.test_storage import new_session

    async def main():
        actor = StorageActor({store}.backend())  # synchronous=FULL, as in production
        async with trio.open_nursery() as nursery:
            storage = await nursery.start(actor.run)
            await storage.write(new_session("survivor"))
            print("acked", flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")


async def test_an_acknowledged_write_survives_sigkill(store: Store):
    if isinstance(store, SqliteStore):
        same_store = f"SqliteStore(Path({str(store.path)!r}))"
    else:
        assert isinstance(store, PostgresStore)
        same_store = f"PostgresStore({store.url!r})"
    script = WRITER.format(root=str(ROOT), store=same_store)
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
    if isinstance(store, SqliteStore):
        assert Path(str(store.path) + "-wal").exists()  # it died without a clean close (no checkpoint)
    with trio.fail_after(10):
        async with open_storage(store.backend()) as (_, storage):
            survivor = await storage.read(sm.GetSession(session_id="survivor"))
            billing = await storage.read(sm.GetBilling(session_id="survivor"))
    assert (survivor.payer, survivor.provider, survivor.state) == ("alice", "bob", "scheduled")
    assert billing is not None and billing.billable_ms == 0


class Flaky(Wrapped):
    """Fails every write as the backend does on an I/O error while `failing` is set — after
    doing part of it, so a batch that is not rolled back would leave something half-written."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.failing = False

    def write(self, conn: Any, request: sm.WriteRequest) -> Any:
        result = self.inner.write(conn, request)
        if self.failing:
            raise StorageUnavailable("disk I/O error")
        return result


async def test_a_failing_backend_gives_storage_unavailable_and_recovers(store: Store):
    backend = Flaky(store.backend())
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
    assert store.count("sessions") == 2
    assert store.count("participants") == 4
    assert store.count("billing") == 2


@asynccontextmanager
async def server_on(backend: Backend, tmp_path: Path) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    settings = test_settings(tmp_path)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        running = await nursery.start(
            lambda task_status: serve(settings, shutdown=shutdown, backend=backend, task_status=task_status)
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}", timeout=15) as http:
            yield running, http
        shutdown.set()


async def test_server_degrades_while_storage_fails_and_heals_without_restart(store: Store, tmp_path):
    from gateway.auth import mint_token

    def auth(user: str, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(SECRET, user, admin=admin)}"}

    body = {"payer": "alice", "provider": "bob", "guests": ["carol"], "rate_per_minute": 60, "currency": "EUR"}
    backend = Flaky(store.backend())
    with trio.fail_after(30):
        async with server_on(backend, tmp_path) as (running, http):
            url = f"ws://127.0.0.1:{running.port}/ws"
            assert (await http.get("/readyz")).status_code == 200
            created = await http.post("/api/sessions", json=body, headers=auth("admin", True))
            session = created.json()["id"]
            async with connect(url, mint_token(SECRET, "alice")) as alice, \
                    connect(url, mint_token(SECRET, "bob")) as bob, \
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


async def test_loading_a_session_is_one_read_with_what_three_reads_gave(store: Store) -> None:
    """`LoadSession` answers in one round trip what a session actor needs to start: the
    session, its last seq, its bill, and every participant's chat marks."""
    with trio.fail_after(30):
        async with open_storage(store.backend()) as (_, storage):
            await storage.write(new_session("s"))
            await storage.write(sm.TransitionSession(session_id="s", name="start", at=1_000))
            await storage.write_many([chat("s", f"c{i}") for i in range(3)])
            await storage.write(sm.RaiseMark(session_id="s", user="bob", kind="read", seq=2))
            await storage.write(sm.RaiseMark(session_id="s", user="alice", kind="delivered", seq=3))
            await storage.write(sm.CheckpointBilling(billing=sm.BillingState(
                session_id="s", rate_per_minute=100, currency="USD", segments=((1_000, 61_000),),
                open=True, checkpoint_at=61_000,
            )))
            loaded = await storage.read(sm.LoadSession(session_id="s"))
            session = await storage.read(sm.GetSession(session_id="s"))
            last_seq, bob = await storage.read(sm.GetChatState(session_id="s", user="bob"))
            billing = await storage.read(sm.GetBilling(session_id="s"))
            await storage.write(new_session("fresh"))
            fresh = await storage.read(sm.LoadSession(session_id="fresh"))
            with pytest.raises(NotFound):
                await storage.read(sm.LoadSession(session_id="nobody"))
    assert loaded.session == session and loaded.session.state == "active"
    assert loaded.last_seq == last_seq == 3
    assert loaded.billing == billing and loaded.billing is not None and loaded.billing.billable_ms == 60_000
    assert dict(loaded.marks) == {"bob": bob, "alice": Marks(delivered_seq=3)} and bob == Marks(delivered_seq=2, read_seq=2)
    assert (fresh.session.state, fresh.last_seq, fresh.marks, fresh.billing) == ("scheduled", 0, (), None)
