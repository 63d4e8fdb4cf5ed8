"""The session actor's billing under a fake clock: ticks, checkpoints, drops, ends, budgets, orphans."""

from __future__ import annotations

import pytest
import trio

from domain.errors import Conflict, StorageUnavailable
from domain.timeline import BILLING_FINALIZED, BILLING_GAP, DROPPED

from .harness import Peer, world


async def test_ticks_push_billing_to_payer_and_provider_and_checkpoint(autojump_clock):
    async with world(billing_tick=5.0) as w:
        sid = await w.create_active(rate=60)  # 1 minor unit per second
        payer, provider, guest_view = Peer("payer"), Peer("provider"), None
        await w.join(payer, sid)
        await trio.sleep(3)
        assert await w.stored_billing(sid) is not None
        assert (await w.live_billing(sid)).billable_ms == 0  # the provider is not here yet
        await w.join(provider, sid)
        start = trio.current_time()
        await trio.sleep_until(start + 12.5)
        ticks = [f for f in payer.frames("billing") if not f["final"]]
        assert [f["billable_ms"] for f in ticks] == [0, 5000, 10000]
        assert [f["amount_minor"] for f in ticks] == [0, 5, 10]
        assert all(f["currency"] == "EUR" for f in ticks)
        assert [f["billable_ms"] for f in provider.frames("billing")] == [0, 5000, 10000]
        stored = await w.stored_billing(sid)
        # a checkpoint holds no time past the last pong each member answered (every second here)
        assert 10000 - 1000 <= stored.billable_ms <= 10000 and stored.open and not stored.final
        assert guest_view is None


async def test_a_dropped_connection_stops_billing_at_its_last_alive_instant(autojump_clock):
    async with world() as w:
        sid = await w.create_active(rate=60)
        payer, provider = Peer("payer"), Peer("provider")
        await w.join(payer, sid)
        await w.join(provider, sid)
        joined_ms = w.clock.now_ms()
        await trio.sleep(60)
        # the heartbeat noticed only now that the provider went silent 30 s after joining
        await w.leave(provider, sid, reason="dropped", last_alive_ms=joined_ms + 30_000)
        assert (await w.live_billing(sid)).billable_ms == 30_000
        assert (await w.stored_billing(sid)).billable_ms == 30_000
        drop = [e for e in await w.timeline(sid) if e.kind == DROPPED]
        assert len(drop) == 1 and drop[0].actor == "provider" and "last_alive" in drop[0].detail
        await trio.sleep(30)
        await w.join(provider, sid)  # rejoin: billing resumes
        await trio.sleep(10)
        result = await w.transition(sid, "end", user="payer")
        assert result["session"]["state"] == "ended"
        final = await w.stored_billing(sid)
        assert final.final and final.billable_ms == 40_000
        finals = [f for f in payer.frames("billing") if f["final"]]
        assert len(finals) == 1 and finals[0]["amount_minor"] == 40


async def test_end_racing_a_tick_bills_once_and_never_changes(autojump_clock):
    async with world(billing_tick=5.0) as w:
        sid = await w.create_active(rate=60)
        payer, provider = Peer("payer"), Peer("provider")
        await w.join(payer, sid)
        await w.join(provider, sid)
        start = trio.current_time()
        await trio.sleep_until(start + 5.0)  # exactly when the tick is due
        await w.transition(sid, "end", user="provider")
        final = await w.stored_billing(sid)
        assert final.final and final.billable_ms == 5000
        await trio.sleep(60)
        assert await w.stored_billing(sid) == final
        assert [f["final"] for f in payer.frames("billing")].count(True) == 1
        assert [e.kind for e in await w.timeline(sid)].count(BILLING_FINALIZED) == 1


async def test_two_ends_at_once_one_wins_one_bill(autojump_clock):
    async with world() as w:
        sid = await w.create_active(rate=60)
        payer, provider = Peer("payer"), Peer("provider")
        await w.join(payer, sid)
        await w.join(provider, sid)
        await trio.sleep(7)
        outcomes = []

        async def end(user):
            try:
                outcomes.append(("ok", (await w.transition(sid, "end", user=user))["session"]["state"]))
            except Conflict as exc:
                outcomes.append(("conflict", exc.state))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(end, "payer")
            nursery.start_soon(end, "provider")
        assert sorted(outcomes) == [("conflict", "ended"), ("ok", "ended")]
        assert (await w.stored_billing(sid)).billable_ms == 7000
        assert [e.kind for e in await w.timeline(sid)].count(BILLING_FINALIZED) == 1


async def test_end_racing_a_disconnect(autojump_clock):
    async with world() as w:
        sid = await w.create_active(rate=60)
        payer, provider = Peer("payer"), Peer("provider")
        await w.join(payer, sid)
        await w.join(provider, sid)
        await trio.sleep(20)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.leave, provider, sid)
            nursery.start_soon(w.transition, sid, "end", "payer")
        final = await w.stored_billing(sid)
        assert final.final and final.billable_ms == 20_000


async def test_budget_warns_a_minute_before_and_ends_at_the_limit(autojump_clock):
    async with world(billing_tick=5.0) as w:
        sid = await w.create_active(rate=60, budget=120)  # 120 s of billable time
        payer, provider = Peer("payer"), Peer("provider")
        await w.join(payer, sid)
        await w.join(provider, sid)
        start = trio.current_time()
        await trio.sleep(200)
        warnings = [f for f in payer.frames("billing") if f.get("warning") == "limit_near"]
        assert len(warnings) == 1 and warnings[0]["billable_ms"] == 60_000
        assert [f for f in provider.frames("billing") if f.get("warning") == "limit_near"]
        session = await w.session(sid)
        assert session.state == "ended" and session.end_reason == "limit_reached"
        assert session.ended_at == w.clock.to_wall_ms(start + 120)
        final = await w.stored_billing(sid)
        assert final.final and final.billable_ms == 120_000
        ended = [f for f in payer.frames("session") if f["session"]["state"] == "ended"]
        assert ended and ended[0]["session"]["end_reason"] == "limit_reached"


async def test_an_active_session_nobody_joins_is_orphaned(autojump_clock):
    async with world(orphan_timeout=120.0) as w:
        sid = await w.create_active()
        await trio.sleep(119)
        assert (await w.session(sid)).state == "active"
        await trio.sleep(2)
        session = await w.session(sid)
        assert (session.state, session.end_reason) == ("ended", "orphaned")
        assert (await w.stored_billing(sid)).final


async def test_orphan_timer_restarts_when_someone_comes_and_goes(autojump_clock):
    async with world(orphan_timeout=120.0) as w:
        sid = await w.create_active()
        payer = Peer("payer")
        await trio.sleep(100)
        await w.join(payer, sid)
        await trio.sleep(500)
        assert (await w.session(sid)).state == "active"  # someone is connected
        await w.leave(payer, sid)
        await trio.sleep(119)
        assert (await w.session(sid)).state == "active"
        await trio.sleep(2)
        assert (await w.session(sid)).end_reason == "orphaned"


async def test_restart_resumes_from_the_checkpoint_without_billing_downtime(autojump_clock, tmp_path):
    path = str(tmp_path / "parley.sqlite3")
    async with world(path, billing_tick=5.0) as w:
        sid = await w.create_active(rate=60)
        await w.join(Peer("payer"), sid)
        await w.join(Peer("provider"), sid)
        await trio.sleep(12)  # checkpoints at 5 s and 10 s; 2 s after the last one are lost
        # leaving the block cancels everything at once, like a crash: nothing more is written
    down_for_ms = 3_600_000
    async with world(path, epoch_ms=w.clock.now_ms() + down_for_ms, billing_tick=5.0) as w2:
        assert 9_000 <= (await w2.stored_billing(sid)).billable_ms <= 10_000  # up to the last pong
        gap = [e for e in await w2.timeline(sid) if e.kind == BILLING_GAP]
        assert len(gap) == 1
        payer, provider = Peer("payer"), Peer("provider")
        await w2.join(payer, sid)
        await w2.join(provider, sid)
        await trio.sleep(5)
        await w2.transition(sid, "end", user="payer")
        final = await w2.stored_billing(sid)
        really_both_present_ms = 12_000 + 5_000
        assert final.billable_ms <= really_both_present_ms
        # at most one tick lost, plus the time since the last pong each had answered
        assert really_both_present_ms - final.billable_ms <= 5_000 + 1_000


async def test_a_session_left_active_by_a_crash_is_orphaned_after_restart(autojump_clock, tmp_path):
    path = str(tmp_path / "parley.sqlite3")
    async with world(path) as w:
        sid = await w.create_active()
        await w.join(Peer("payer"), sid)
    async with world(path, epoch_ms=w.clock.now_ms() + 1000, orphan_timeout=120.0) as w2:
        await trio.sleep(121)
        assert (await w2.session(sid)).end_reason == "orphaned"


async def test_billing_survives_a_storage_outage(autojump_clock, tmp_path):
    from .harness import FlakyBackend

    backend = FlakyBackend(tmp_path / "parley.sqlite3", synchronous="OFF")
    async with world(backend=backend, billing_tick=5.0) as w:
        sid = await w.create_active(rate=60)
        payer, provider = Peer("payer"), Peer("provider")
        await w.join(payer, sid)
        await w.join(provider, sid)
        start = trio.current_time()
        await trio.sleep_until(start + 6)
        backend.failing = True
        await trio.sleep_until(start + 16)
        # the meter kept moving for the users; the database kept the last good checkpoint
        assert [f["billable_ms"] for f in payer.frames("billing")][-1] == 15_000
        assert 4_000 <= (await w.stored_billing(sid)).billable_ms <= 5_000  # up to the last pong
        with pytest.raises(StorageUnavailable):
            await w.transition(sid, "end", user="payer")
        assert (await w.session(sid)).state == "active"  # nothing half-written
        backend.failing = False
        await trio.sleep_until(start + 21)
        assert 19_000 <= (await w.stored_billing(sid)).billable_ms <= 20_000
        await w.transition(sid, "end", user="payer")
        final = await w.stored_billing(sid)
        assert final.final and final.billable_ms == 21_000
