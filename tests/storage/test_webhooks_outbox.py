"""The webhook outbox on a real database (SQLite and PostgreSQL): events are written by the
same transaction as the change they report, for the subscribed endpoints only; a refused
change writes none; a failing event holds back only the later events of its own session."""

from __future__ import annotations

import orjson
import trio

from domain import timeline as tl
from domain import webhooks as wh
from domain.errors import Conflict
from storage import messages as sm
from storage import webhook_messages as w
from tests.storage.conftest import Store
from tests.storage.test_storage import new_session, open_storage

T0 = 1_700_000_000_000


def endpoint(endpoint_id: str, events: tuple[str, ...] = wh.EVENT_TYPES, **fields) -> w.CreateEndpoint:
    return w.CreateEndpoint(endpoint=wh.Endpoint(
        id=endpoint_id, url=f"https://example.com/{endpoint_id}", events=events, secret=wh.new_secret(),
        created_at=T0, updated_at=T0, **fields,
    ))


def entry(session_id: str, kind: str, actor: str = "alice", **detail) -> tl.TimelineEntry:
    return tl.TimelineEntry(session_id=session_id, at=T0 + 1000, kind=kind, actor=actor, detail=detail)


def final_bill(session_id: str, segments=((T0 + 1000, T0 + 61_000),)) -> sm.BillingState:
    return sm.BillingState(session_id=session_id, rate_per_minute=100, currency="USD", segments=segments, final=True)


async def full_session(storage, session_id: str) -> None:
    await storage.write(new_session(session_id))
    await storage.write(sm.TransitionSession(session_id=session_id, name="start", at=T0 + 500))
    await storage.write(sm.AppendTimeline(entries=(entry(session_id, tl.JOINED, connection="c1"),)))
    await storage.write(sm.CheckpointBilling(
        billing=sm.BillingState(session_id=session_id, rate_per_minute=100, currency="USD", open=True),
        timeline=(entry(session_id, tl.JOINED, "bob", connection="c2"),),
    ))
    await storage.write(sm.AppendTimeline(entries=(entry(session_id, tl.BILLING_LIMIT_NEAR, "server",
                                                         billable_ms=30_000),)))
    await storage.write(sm.CheckpointBilling(
        billing=sm.BillingState(session_id=session_id, rate_per_minute=100, currency="USD", open=False),
        timeline=(entry(session_id, tl.DROPPED, "bob", connection="c2", reason="dropped"),),
    ))
    await storage.write(sm.TransitionSession(
        session_id=session_id, name="end", at=T0 + 61_000, end_reason="ended", final_billing=final_bill(session_id),
        timeline=(entry(session_id, tl.ENDED, reason="ended"),),
    ))


def deliveries(store: Store) -> list[tuple[str, str, str, bytes]]:
    return [
        (row[0], row[1], row[2], bytes(row[3]))
        for row in store.query(
            "SELECT d.endpoint_id, e.type, e.id, e.body FROM webhook_deliveries d"
            " JOIN webhook_events e ON e.seq = d.event_seq ORDER BY d.id"
        )
    ]


async def test_session_writes_yield_their_events_for_subscribed_endpoints(store: Store):
    with trio.fail_after(20):
        async with open_storage(store.backend()) as (_, storage):
            await storage.write(endpoint("all"))
            await storage.write(endpoint("ends", events=(wh.SESSION_ENDED,)))
            await storage.write(endpoint("off", enabled=False))
            await full_session(storage, "s1")
    rows = deliveries(store)
    assert [t for e, t, _, _ in rows if e == "all"] == [
        "session.created", "session.started", "participant.joined", "participant.joined",
        "billing.limit_near", "participant.dropped", "session.ended",
    ]
    assert [t for e, t, _, _ in rows if e == "ends"] == ["session.ended"]
    assert not [r for r in rows if r[0] == "off"]
    ended = [r for r in rows if r[1] == "session.ended"]
    assert ended[0][2] == ended[1][2]  # one event, one webhook-id, for every endpoint
    body = orjson.loads(ended[0][3])
    assert body["type"] == "session.ended" and body["timestamp"].endswith("Z")
    assert body["data"]["billable_ms"] == 60_000
    assert body["data"]["amount_minor"] == 100
    assert body["data"]["currency"] == "USD" and body["data"]["end_reason"] == "ended"
    assert body["data"]["session"]["state"] == "ended"
    limit = orjson.loads([r for r in rows if r[1] == "billing.limit_near"][0][3])["data"]
    assert limit == {"session_id": "s1", "billable_ms": 30_000, "amount_minor": 50, "max_amount_minor": None,
                     "currency": "USD"}
    dropped = orjson.loads([r for r in rows if r[1] == "participant.dropped"][0][3])["data"]
    assert dropped["user"] == "bob" and dropped["reason"] == "dropped"


async def test_a_refused_change_writes_no_event_and_no_endpoint_writes_nothing(store: Store):
    with trio.fail_after(20):
        async with open_storage(store.backend()) as (_, storage):
            await storage.write(new_session("quiet"))  # nobody subscribed yet
            await storage.write(endpoint("all"))
            results = await storage.write_many([
                sm.TransitionSession(session_id="quiet", name="cancel", at=T0 + 1),
                sm.TransitionSession(session_id="quiet", name="start", at=T0 + 2),  # refused: cancelled
            ])
            assert isinstance(results[1].error, Conflict)
    assert [t for _, t, _, _ in deliveries(store)] == ["session.cancelled"]
    assert store.count("webhook_events") == 1


async def test_due_deliveries_keep_each_sessions_order_per_endpoint(store: Store):
    with trio.fail_after(20):
        async with open_storage(store.backend()) as (_, storage):
            await storage.write(endpoint("a"))
            await storage.write(endpoint("b"))
            await storage.write(new_session("s1"))
            await storage.write(new_session("s2"))
            now = T0 + 10_000
            due = (await storage.read(w.DueDeliveries(now=now, limit=100, per_endpoint=10))).due
            # the head of each (endpoint, session): s1 and s2 created, for a and b
            assert sorted((d.endpoint_id, d.session_id) for d in due) == [
                ("a", "s1"), ("a", "s2"), ("b", "s1"), ("b", "s2")]
            await storage.write(sm.TransitionSession(session_id="s1", name="start", at=T0 + 5))
            # s1's created event fails at endpoint a: its later event waits, s2 and endpoint b do not
            a_s1 = next(d for d in due if (d.endpoint_id, d.session_id) == ("a", "s1"))
            await storage.write(w.RecordAttempt(
                delivery_id=a_s1.id, at=now, status=wh.PENDING, http_status=500, error="HTTP 500",
                next_attempt_at=now + 60_000,
            ))
            for d in due:
                if d.id != a_s1.id:
                    await storage.write(w.RecordAttempt(
                        delivery_id=d.id, at=now, status=wh.DELIVERED, http_status=200, error=None,
                        next_attempt_at=None,
                    ))
            batch = await storage.read(w.DueDeliveries(now=now, limit=100, per_endpoint=10))
            assert [(d.endpoint_id, d.session_id) for d in batch.due] == [("b", "s1")]
            assert batch.next_attempt_at == now + 60_000
            assert batch.oldest_pending_at == T0
            later = await storage.read(w.DueDeliveries(now=now + 60_000, limit=100, per_endpoint=10))
            assert [(d.endpoint_id, d.session_id, d.attempts) for d in later.due] == [
                ("b", "s1", 0), ("a", "s1", 1)]
            page, cursor = await storage.read(w.ListDeliveries(endpoint_id="a", limit=2))
            assert [(d.event_type, d.session_id) for d in page] == [
                ("session.started", "s1"), ("session.created", "s2")]
            rest, end = await storage.read(w.ListDeliveries(endpoint_id="a", cursor=cursor, limit=2))
            assert [(d.event_type, d.session_id) for d in rest] == [("session.created", "s1")] and end is None
            failing = rest[0]
            assert failing.last_status == 500 and failing.attempts == 1 and failing.status == wh.PENDING
            retried = await storage.write(w.RetryDelivery(endpoint_id="a", delivery_id=failing.id, at=now + 1))
            assert retried.status == wh.PENDING and retried.next_attempt_at == now + 1
