"""The delivery actor alone, under a fake clock (a day of retries takes milliseconds):
storage in memory, HTTP through an in-process transport whose handler checks every
signature with the `standardwebhooks` package."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import httpx
import orjson
import trio
from standardwebhooks import Webhook

from actors.clock import WallClock
from actors.webhooks import WebhookActor
from domain import webhooks as wh
from domain.session import SessionRecord
from domain.timeline import CREATED, TimelineEntry
from storage import messages as sm
from storage import webhook_messages as w
from storage.actor import StorageActor, StorageHandle
from storage.sqlite_backend import SqliteBackend

T0 = 1_700_000_000_000
DAY_S = 24 * 3600


class _AnyTimeWebhook(Webhook):
    """The library's verification, without its check against the real clock (the fake one is a day ahead)."""

    def _Webhook__verify_timestamp(self, header: str) -> datetime:  # noqa: N802 (the library's mangled name)
        return datetime.fromtimestamp(float(header), tz=timezone.utc)


@dataclass
class Hit:
    at: float
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict:
        return orjson.loads(self.body)


@dataclass
class Harness:
    storage: StorageHandle
    clock: WallClock
    hits: dict[str, list[Hit]] = field(default_factory=dict)
    secrets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    async def endpoint(self, name: str, events: tuple[str, ...] = wh.EVENT_TYPES) -> wh.Endpoint:
        secret = wh.new_secret()
        self.secrets[name] = (secret,)
        now = self.clock.now_ms()
        return await self.storage.write(w.CreateEndpoint(endpoint=wh.Endpoint(
            id=name, url=f"http://hooks.test/{name}", events=events, secret=secret, created_at=now, updated_at=now,
        )))

    async def session(self, session_id: str | None = None) -> str:
        now = self.clock.now_ms()
        record = SessionRecord(id=session_id or uuid.uuid4().hex, payer="alice", provider="bob", rate_per_minute=100,
                               currency="USD", created_at=now, created_by="admin")
        await self.storage.write(sm.CreateSession(
            session=record, timeline=TimelineEntry(session_id=record.id, at=now, kind=CREATED, actor="admin"),
        ))
        return record.id

    async def deliveries(self, endpoint: str) -> tuple[wh.Delivery, ...]:
        page, _ = await self.storage.read(w.ListDeliveries(endpoint_id=endpoint, limit=200))
        return page

    async def settled(self, endpoint: str) -> tuple[wh.Delivery, ...]:
        """The delivery log once every hit so far is recorded (no attempt still under way)."""
        while True:
            log = await self.deliveries(endpoint)
            if sum(d.attempts for d in log) == len(self.hits.get(endpoint, [])):
                return log
            await trio.sleep(0.01)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.changed.wait()
            self.changed = trio.Event()


@asynccontextmanager
async def harness(respond: Callable[[str, Hit], Awaitable[int]]) -> AsyncIterator[Harness]:
    backend = SqliteBackend(":memory:")
    async with trio.open_nursery() as nursery:
        storage = await nursery.start(StorageActor(backend, inline=True).run)
        h = Harness(storage=storage, clock=WallClock(epoch_ms=T0))

        async def handler(request: httpx.Request) -> httpx.Response:
            name = request.url.path.strip("/")
            hit = Hit(at=trio.current_time(), headers=dict(request.headers), body=await request.aread())
            for secret in h.secrets[name]:
                _AnyTimeWebhook(secret).verify(hit.body, hit.headers)  # raises unless signed with it
            h.hits.setdefault(name, []).append(hit)
            h.changed.set()
            return httpx.Response(await respond(name, hit))

        actor = WebhookActor(storage, h.clock, commits=backend.webhook_commits, allow_private=True,
                             transport=httpx.MockTransport(handler), rng=random.Random(7),
                             poll_interval=600)  # retries wake it at their instant; fewer idle looks over a day
        webhooks = await nursery.start(actor.run)
        yield h
        webhooks.stop()
        await storage.aclose()


async def test_retries_keep_the_webhook_id_and_back_off_more_each_time(autojump_clock):
    async def respond(name: str, hit: Hit) -> int:
        return 500 if len(h.hits[name]) <= 4 else 200

    with trio.fail_after(DAY_S):
        async with harness(respond) as h:
            await h.endpoint("a")
            await h.session()
            await h.wait_for(lambda: len(h.hits.get("a", [])) == 5)
            [delivery] = await h.settled("a")
    hits = h.hits["a"]
    assert len({hit.headers["webhook-id"] for hit in hits}) == 1
    assert hits[0].headers["webhook-id"] == delivery.event_id
    gaps = [b.at - a.at for a, b in zip(hits, hits[1:])]
    for n, gap in enumerate(gaps, start=1):  # 5 s, 10 s, 20 s, 40 s, each ±20 %
        base = wh.RETRY_BASE_S * 2 ** (n - 1)
        assert base * 0.8 <= gap <= base * 1.2 + 0.01, gaps
    assert gaps == sorted(gaps)
    timestamps = [int(hit.headers["webhook-timestamp"]) for hit in hits]
    assert timestamps == sorted(timestamps) and timestamps[-1] > timestamps[0]  # signed when sent, not when made
    assert (delivery.status, delivery.attempts, delivery.last_status) == (wh.DELIVERED, 5, 200)


async def test_a_failing_event_holds_back_its_session_only_then_fails_after_a_day(autojump_clock):
    async def respond(name: str, hit: Hit) -> int:
        return 503 if hit.event["data"]["session_id"] == "stuck" and hit.event["type"] == "session.created" else 200

    with trio.fail_after(3 * DAY_S):
        async with harness(respond) as h:
            await h.endpoint("a")
            start = trio.current_time()
            await h.session("stuck")
            await h.storage.write(sm.TransitionSession(session_id="stuck", name="cancel", at=h.clock.now_ms()))
            await h.session("free")
            await h.wait_for(lambda: [hit.event["type"] for hit in h.hits.get("a", [])].count("session.created") >= 2)
            assert all(hit.event["type"] != "session.cancelled" for hit in h.hits["a"])  # held back behind its session
            await h.wait_for(lambda: any(hit.event["type"] == "session.cancelled" for hit in h.hits["a"]))
            logged = {d.event_type + ":" + d.session_id: d for d in await h.settled("a")}
    stuck = logged["session.created:stuck"]
    assert stuck.status == wh.FAILED and stuck.last_status == 503 and stuck.last_error == "HTTP 503"
    attempts = [hit for hit in h.hits["a"] if hit.event["data"]["session_id"] == "stuck"
                and hit.event["type"] == "session.created"]
    assert attempts[-1].at - start >= DAY_S  # retried for at least 24 h
    assert len(attempts) == stuck.attempts
    free = [hit for hit in h.hits["a"] if hit.event["data"]["session_id"] == "free"]
    assert free and free[0].at - start < 1  # never waited behind the stuck session
    cancelled = next(hit for hit in h.hits["a"] if hit.event["type"] == "session.cancelled")
    assert cancelled.at >= attempts[-1].at
    assert logged["session.cancelled:stuck"].status == wh.DELIVERED


async def test_a_410_disables_the_endpoint_and_a_timeout_is_retried(autojump_clock):
    async def respond(name: str, hit: Hit) -> int:
        if name == "slow" and len(h.hits[name]) == 1:
            await trio.sleep(60)  # past the 10 s deadline
        return 410 if name == "gone" else 200

    with trio.fail_after(DAY_S):
        async with harness(respond) as h:
            await h.endpoint("gone")
            await h.endpoint("slow")
            await h.session()
            await h.wait_for(lambda: len(h.hits.get("slow", [])) == 2)
            endpoint = await h.storage.read(w.GetEndpoint(endpoint_id="gone"))
            [gone] = await h.settled("gone")
            [slow] = await h.settled("slow")
    assert not endpoint.enabled and "410" in (endpoint.disabled_reason or "")
    assert (gone.status, gone.last_status, gone.attempts) == (wh.FAILED, 410, 1)
    assert (slow.status, slow.attempts) == (wh.DELIVERED, 2)
    first, second = h.hits["slow"]
    assert wh.REQUEST_TIMEOUT_S + 4 <= second.at - first.at <= wh.REQUEST_TIMEOUT_S + 6.01


async def test_a_rotated_secret_signs_beside_the_new_one_for_a_day(autojump_clock):
    async def respond(name: str, hit: Hit) -> int:
        return 200

    with trio.fail_after(3 * DAY_S):
        async with harness(respond) as h:
            old = (await h.endpoint("a")).secret
            new = wh.new_secret()
            now = h.clock.now_ms()
            await h.storage.write(w.UpdateEndpoint(
                endpoint_id="a", at=now, secret=new, previous_secret_until=now + wh.PREVIOUS_SECRET_GRACE_MS,
            ))
            h.secrets["a"] = (old, new)
            await h.session()
            await h.wait_for(lambda: len(h.hits.get("a", [])) == 1)
            assert len(h.hits["a"][0].headers["webhook-signature"].split(" ")) == 2
            await trio.sleep(DAY_S)
            h.secrets["a"] = (new,)
            await h.session()
            await h.wait_for(lambda: len(h.hits.get("a", [])) == 2)
    assert len(h.hits["a"][1].headers["webhook-signature"].split(" ")) == 1
