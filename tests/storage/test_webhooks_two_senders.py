"""Two delivery actors on one PostgreSQL database (two nodes of a cluster): each event is
sent once, by exactly one of them, and in each session's order."""

from __future__ import annotations

import uuid

import httpx
import orjson
import trio

from actors.clock import WallClock
from actors.webhooks import WebhookActor
from domain import webhooks as wh
from domain.session import SessionRecord
from domain.timeline import CREATED, TimelineEntry
from storage import messages as sm
from storage import webhook_messages as w
from storage.actor import StorageActor
from storage.postgres_backend import PostgresBackend

SESSIONS = 20


async def test_two_senders_on_one_database_send_each_event_once(postgres_url):
    hits: list[tuple[str, str, str]] = []  # (sender, webhook-id, session)
    types: dict[str, list[str]] = {}  # session → event types in arrival order

    def receiver(sender: str):
        async def handle(request: httpx.Request) -> httpx.Response:
            body = orjson.loads(await request.aread())
            hits.append((sender, request.headers["webhook-id"], body["data"]["session_id"]))
            types.setdefault(body["data"]["session_id"], []).append(body["type"])
            await trio.sleep(0.01)  # both senders have time to look at the same due rows
            return httpx.Response(200)

        return httpx.MockTransport(handle)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            backends = [PostgresBackend(postgres_url), PostgresBackend(postgres_url)]
            first = await nursery.start(StorageActor(backends[0]).run)
            second = await nursery.start(StorageActor(backends[1]).run)
            clock = WallClock()
            now = clock.now_ms()
            await first.write(w.CreateEndpoint(endpoint=wh.Endpoint(
                id="hook", url="http://hooks.test/", events=wh.EVENT_TYPES, secret=wh.new_secret(),
                created_at=now, updated_at=now,
            )))
            senders = []
            for name, storage, backend in (("a", first, backends[0]), ("b", second, backends[1])):
                actor = WebhookActor(storage, clock, commits=backend.webhook_commits, allow_private=True,
                                     transport=receiver(name), poll_interval=0.05)
                senders.append(await nursery.start(actor.run))
            for _ in range(SESSIONS):  # each makes session.created, then session.started
                sid = uuid.uuid4().hex
                record = SessionRecord(id=sid, payer="alice", provider="bob", rate_per_minute=60,
                                       currency="USD", created_at=clock.now_ms(), created_by="admin")
                await first.write(sm.CreateSession(
                    session=record, timeline=TimelineEntry(session_id=sid, at=record.created_at, kind=CREATED,
                                                           actor="admin"),
                ))
                await second.write(sm.TransitionSession(session_id=sid, name="start", at=clock.now_ms()))
            while len({hook_id for _, hook_id, _ in hits}) < 2 * SESSIONS:
                await trio.sleep(0.05)
            await trio.sleep(0.5)  # time enough for a second send of anything, were there one
            for sender in senders:
                sender.stop()
            await first.aclose()
            await second.aclose()
    ids = [hook_id for _, hook_id, _ in hits]
    assert len(ids) == len(set(ids)) == 2 * SESSIONS  # every event once, by one sender
    assert {sender for sender, _, _ in hits} == {"a", "b"}  # both took part
    by_session: dict[str, list[str]] = {}
    for _, hook_id, sid in hits:
        by_session.setdefault(sid, []).append(hook_id)
    assert all(len(ids) == 2 for ids in by_session.values())
    assert all(seen == ["session.created", "session.started"] for seen in types.values())  # in order
