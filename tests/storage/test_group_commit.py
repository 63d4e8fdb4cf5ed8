"""Chat inserts in a group commit, on both databases: a run of `InsertMessage` requests in a
batch is stored together (`insert_messages`: one numbering update per session, one
executemany), and answered exactly as one-by-one writes would be — seq gapless per session
in queue order, a resent `client_id` answered with the original, a fenced session's writes
refused while the rest of the batch commits."""

from __future__ import annotations

import dataclasses
from typing import Any

import outcome
import pytest
import trio

from domain.errors import Fenced, NotFound
from storage import messages as sm
from tests.storage.conftest import Store
from tests.storage.test_storage import Wrapped, chat, new_session, open_storage


class Counting(Wrapped):
    """Counts how the actor drives the backend: grouped runs, single writes, savepoints."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.runs: list[int] = []
        self.few_statements: list[bool] = []  # as the actor asked for each run
        self.force_few = False  # send every run in few statements, as beside a saturated loop
        self.writes: list[str] = []
        self.savepoints = 0

    def insert_messages(self, conn: Any, requests: Any, *, few_statements: bool = False) -> Any:
        self.runs.append(len(requests))
        self.few_statements.append(few_statements)
        return self.inner.insert_messages(conn, requests, few_statements=self.force_few or few_statements)

    def write(self, conn: Any, request: Any) -> Any:
        self.writes.append(type(request).__name__)
        return self.inner.write(conn, request)

    def savepoint(self, conn: Any) -> None:
        self.savepoints += 1
        self.inner.savepoint(conn)

    def reset(self) -> None:
        self.runs.clear()
        self.few_statements.clear()
        self.writes.clear()
        self.savepoints = 0


def seqs(store: Store, session_id: str) -> list[int]:
    return [row[0] for row in store.query(f"SELECT seq FROM messages WHERE session_id = '{session_id}' ORDER BY seq")]


async def test_a_batch_of_chat_inserts_is_stored_in_runs_without_savepoints(store: Store):
    backend = Counting(store.backend())
    with trio.fail_after(20):
        async with open_storage(backend) as (_, storage):
            for session_id in ("a", "b", "c"):
                await storage.write(new_session(session_id))
            first, _ = await storage.write(chat("a", "a1"))
            backend.reset()
            before = storage.statistics()
            batch = [
                chat("a", "a2"), chat("b", "b1"), chat("c", "c1"), chat("a", "a3"),
                chat("c", "c1"),  # resent in the same batch: the first one's answer
                chat("b", "b2", sender="bob"), chat("b", "b1", sender="bob"),  # another sender's b1 is new
                sm.RaiseMark(session_id="a", user="bob", kind="read", seq=1),  # ends the first run
                chat("a", "a4"), chat("c", "c2"),
            ]
            results = [r.unwrap() for r in await storage.write_many(batch)]
            after = storage.statistics()
    assert after.batches - before.batches == 1  # one group commit
    assert backend.runs == [7, 2] and backend.writes == ["RaiseMark"] and backend.savepoints == 0
    answers = [(m.session_id, m.client_id, m.seq, dup) for m, dup in (r for r in results if isinstance(r, tuple))]
    assert answers == [
        ("a", "a2", 2, False), ("b", "b1", 1, False), ("c", "c1", 1, False), ("a", "a3", 3, False),
        ("c", "c1", 1, True), ("b", "b2", 2, False), ("b", "b1", 3, False), ("a", "a4", 4, False),
        ("c", "c2", 2, False),
    ]
    assert results[4][0] == results[2][0]  # the original message: same id, seq, body
    assert results[0][0].id == batch[0].message.id  # the server-made id is the one stored
    assert (seqs(store, "a"), seqs(store, "b"), seqs(store, "c")) == ([1, 2, 3, 4], [1, 2, 3], [1, 2])
    assert store.query("SELECT id, last_seq FROM sessions ORDER BY id") == [("a", 4), ("b", 3), ("c", 2)]
    assert first.seq == 1


async def test_a_fenced_session_and_a_resent_message_do_not_undo_the_group(store: Store):
    """Three sessions in one batch: `b`'s writes carry a stale epoch, `a` resends a message
    stored in an earlier batch, `c` and `d` (unknown) are plain. The grouped insert cannot
    answer that by itself; the batch is replayed one request at a time, and the right ones
    commit, numbered without gaps."""
    backend = Counting(store.backend())
    with trio.fail_after(20):
        async with open_storage(backend) as (_, storage):
            for session_id in ("a", "b", "c"):
                await storage.write(new_session(session_id))
            assert await storage.write(sm.ClaimSession(session_id="b", node="n1")) == 1
            await storage.write(dataclasses.replace(chat("b", "b0"), epoch=1))
            assert await storage.write(sm.ClaimSession(session_id="b", node="n2")) == 2  # n1 is fenced now
            stored, _ = await storage.write(chat("a", "a1"))
            backend.reset()
            before = storage.statistics()
            batch = [
                chat("a", "a2"),
                dataclasses.replace(chat("b", "b1"), epoch=1),
                chat("c", "c1"),
                chat("a", "a1"),  # stored already: the original comes back, no number used
                dataclasses.replace(chat("b", "b2"), epoch=2),  # the current owner's
                chat("d", "d1"),
                chat("c", "c2"),
                chat("a", "a3"),
            ]
            results = await storage.write_many(batch)
            after = storage.statistics()
    assert after.batches - before.batches == 1 and after.failed_batches == before.failed_batches
    assert backend.savepoints == len(batch)  # replayed request by request
    assert isinstance(results[1], outcome.Error) and isinstance(results[1].error, Fenced)
    assert isinstance(results[5], outcome.Error) and isinstance(results[5].error, NotFound)
    values = [r.unwrap() for i, r in enumerate(results) if i not in (1, 5)]
    assert [(m.session_id, m.client_id, m.seq, dup) for m, dup in values] == [
        ("a", "a2", 2, False), ("c", "c1", 1, False), ("a", "a1", 1, True), ("b", "b2", 2, False),
        ("c", "c2", 2, False), ("a", "a3", 3, False),
    ]
    assert values[2][0] == stored  # the original id and seq
    assert (seqs(store, "a"), seqs(store, "b"), seqs(store, "c")) == ([1, 2, 3], [1, 2], [1, 2])
    assert store.query("SELECT id, last_seq FROM sessions ORDER BY id") == [("a", 3), ("b", 2), ("c", 2)]
    assert store.query("SELECT client_id FROM messages WHERE session_id = 'b' ORDER BY seq") == [("b0",), ("b2",)]


async def test_the_next_batch_after_a_replay_is_grouped_again(store: Store):
    backend = Counting(store.backend())
    with trio.fail_after(20):
        async with open_storage(backend) as (_, storage):
            await storage.write(new_session("a"))
            results = await storage.write_many([chat("a", "a1"), chat("nope", "x1"), chat("a", "a2")])
            assert [type(r) for r in results] == [outcome.Value, outcome.Error, outcome.Value]
            backend.reset()
            again = [r.unwrap() for r in await storage.write_many([chat("a", "a3"), chat("a", "a4"), chat("a", "a3")])]
    assert backend.runs == [3] and backend.savepoints == 0
    assert [(m.seq, dup) for m, dup in again] == [(3, False), (4, False), (3, True)]
    assert seqs(store, "a") == [1, 2, 3, 4]


def test_a_chat_insert_reports_no_webhook_event():
    """`insert_messages` writes no outbox rows for its run: if chat inserts ever report a webhook
    event, that method must write it in the run's transaction as `write` does."""
    from storage.sqlite_backend import SqliteBackend

    request = chat("a", "a1")
    assert SqliteBackend(":memory:")._events_of(None, request, (request.message, False)) == []


BODIES = [
    "plain", "quote \" and backslash \\ and a slash /", "line\nbreak\ttab\r", "emoji 😀 and \u2028 \u2029",
    "ünïcödé " * 50, "x" * 4000, "",
]
# SQLite cannot take these over JSON: they go the run's other way (a literal `\u0000` only looks
# like an escaped NUL in the JSON text, and is sent the other way too)
NUL_BODIES = ["before\x00after", "\x00", "a literal \\u0000 is six characters"]


@pytest.mark.parametrize("few", [False, True], ids=["executemany", "few statements"])
async def test_a_grouped_run_stores_every_body_exactly_as_sent(store: Store, few: bool):
    """Beside a saturated loop SQLite sends a run as one statement over a JSON array: what it
    stores must be exactly what was sent either way, and a body JSON cannot carry through SQLite
    (an embedded NUL, which SQLite's JSON functions cut off) is stored exactly too, by the run's
    other way. (PostgreSQL refuses NUL in text: `test_values_the_database_cannot_store_are_bad_requests`.)"""
    backend = Counting(store.backend())
    backend.force_few = few
    with trio.fail_after(20):
        async with open_storage(backend) as (_, storage):
            await storage.write(new_session("a"))
            await storage.write(new_session("b"))
            backend.reset()
            batch = [chat("a", f"a{n}") for n in range(len(BODIES))]
            batch = [dataclasses.replace(r, message=dataclasses.replace(r.message, body=body))
                     for r, body in zip(batch, BODIES)]
            nul = [dataclasses.replace(chat("b", f"b{n}"), message=dataclasses.replace(
                chat("b", f"b{n}").message, body=body)) for n, body in enumerate(NUL_BODIES)]
            if store.kind != "sqlite":
                nul = [chat("b", "b0"), chat("b", "b1"), chat("b", "b2")]
            answers = [r.unwrap() for r in await storage.write_many(batch)]
            answers += [r.unwrap() for r in await storage.write_many(nul)]
            history = await storage.read(sm.GetMessages(session_id="a", limit=100))
            history += await storage.read(sm.GetMessages(session_id="b", limit=100))
    assert backend.runs == [len(BODIES), len(NUL_BODIES)] and backend.savepoints == 0
    assert backend.few_statements == [False, False]  # nothing saturates this loop
    sent = [r.message.body for r in batch + nul]
    assert [m.body for m, _ in answers] == sent
    assert [m.body for m in history] == sent
    assert [m.seq for m in history] == [*range(1, len(BODIES) + 1), *range(1, len(NUL_BODIES) + 1)]
    assert store.query("SELECT body FROM messages ORDER BY session_id, seq") == [(body,) for body in sent]
