"""Chat edge rules: typing floods are bounded, stale receipts are silent, the database numbers messages."""

from __future__ import annotations

import trio

from domain.chat import ChatMessage
from domain.session import SessionRecord
from domain.timeline import TimelineEntry
from storage import messages as sm
from storage.actor import StorageActor
from storage.sqlite_backend import SqliteBackend


async def _quiet(client, seconds=0.3):
    await trio.sleep(seconds)


async def test_toggling_typing_cannot_flood_the_others(make_server):
    server = await make_server(frames_per_second=1000.0, frame_burst=1000)
    sid = (await server.create_session())["id"]
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.request("join", session=sid)
        await bob.request("join", session=sid)
        for _ in range(50):
            await alice.request("typing", session=sid, active=True)
            await alice.request("typing", session=sid, active=False)
        await _quiet(bob)
        seen = bob.pending_events("typing")
        assert 2 <= len(seen) <= 2 * 5  # the burst (4) and maybe one refill, each with its false
        assert [e["active"] for e in seen] == [True, False] * (len(seen) // 2)


async def test_a_stale_receipt_tells_nobody(server):
    sid = (await server.create_session())["id"]
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.request("join", session=sid)
        await bob.request("join", session=sid)
        for n in range(3):
            await alice.request("chat.send", session=sid, client_id=f"m{n}", body=f"hello {n}")
        reply = await bob.request("chat.receipt", session=sid, kind="read", seq=3)
        assert (reply["read_seq"], reply["delivered_seq"]) == (3, 3)
        assert (await alice.next_event("receipt"))["seq"] == 3
        stale = await bob.request("chat.receipt", session=sid, kind="read", seq=1)
        assert stale["read_seq"] == 3  # marks never move back
        await _quiet(alice)
        assert alice.pending_events("receipt") == []


async def test_the_database_numbers_messages_even_from_a_stale_hint(tmp_path):
    async with trio.open_nursery() as nursery:
        storage = await nursery.start(StorageActor(SqliteBackend(tmp_path / "db.sqlite3")).run)
        await storage.write(sm.CreateSession(
            session=SessionRecord(
                id="s", payer="a", provider="b", rate_per_minute=1, currency="USD", created_at=0),
            timeline=TimelineEntry(
                session_id="s", at=0, kind="created", actor="admin"),
        ))

        def message(client_id: str, seq_hint: int) -> sm.InsertMessage:
            return sm.InsertMessage(message=ChatMessage(
                id=client_id, session_id="s", seq=seq_hint, client_id=client_id, sender="a",
                body="x", created_at=0))

        first, _ = await storage.write(message("one", 1))
        second, _ = await storage.write(message("two", 1))  # a stale hint
        again, duplicate = await storage.write(message("one", 7))
        assert (first.seq, second.seq) == (1, 2)
        assert duplicate and again.seq == 1
        await storage.aclose()
