"""Billing's two promises across a crash: never a ghost, never time lost to a clock step."""

from __future__ import annotations

import trio

from domain.timeline import BILLING_GAP

from .harness import Peer, world

HOUR_MS = 3_600_000


async def test_a_crash_soon_after_a_silent_drop_bills_no_ghost_time(autojump_clock, tmp_path):
    """The provider's cable is pulled 20 s into the call; the server dies 13 s later, before
    its heartbeat could notice (two intervals). Ticks kept checkpointing meanwhile, but no
    checkpoint holds time past the provider's last pong."""
    path = str(tmp_path / "parley.sqlite3")
    async with world(path, billing_tick=5.0, heartbeat=15.0) as w:
        sid = await w.create_active(rate=60)
        payer, provider = Peer("payer"), Peer("provider")
        await w.join(payer, sid)
        await w.join(provider, sid)
        both_since_ms = w.clock.now_ms()
        await trio.sleep(20)  # a pong each at 15 s
        w.stop_answering(provider, sid)
        await trio.sleep(13)  # ticks at 25 s and 30 s; the crash comes at 33 s
    async with world(path, epoch_ms=w.clock.now_ms() + 60_000) as w2:
        stored = await w2.stored_billing(sid)
        assert stored.billable_ms <= 20_000  # not 30 s: nobody was known to be there
        assert stored.billable_ms == 15_000  # up to the last pong both answered
        assert all(end <= both_since_ms + 20_000 for _, end in stored.segments)


async def test_billing_survives_the_clock_stepped_back_across_a_restart(autojump_clock, tmp_path):
    """The clock ran an hour ahead, the server was killed, the clock was corrected while it
    was down: the call's time after the restart is billed, and no stored instant goes back."""
    path = str(tmp_path / "parley.sqlite3")
    ahead = 1_800_000_000_000 + HOUR_MS
    async with world(path, epoch_ms=ahead, billing_tick=5.0) as w:
        sid = await w.create_active(rate=60)
        await w.join(Peer("payer"), sid)
        await w.join(Peer("provider"), sid)
        await trio.sleep(30)
    async with world(path, epoch_ms=ahead - HOUR_MS + 30_000, billing_tick=5.0) as w2:  # an hour back
        payer, provider = Peer("payer"), Peer("provider")
        await w2.join(payer, sid)
        await w2.join(provider, sid)
        await trio.sleep(60)
        await w2.transition(sid, "end", user="payer")
        final = await w2.stored_billing(sid)
        really_both_present_ms = 30_000 + 60_000
        assert final.billable_ms <= really_both_present_ms
        assert really_both_present_ms - final.billable_ms <= 5_000 + 1_000  # a tick and a pong
        session = await w2.session(sid)
        assert session.ended_at >= session.started_at
        entries = await w2.timeline(sid)
        assert [e.at for e in entries] == sorted(e.at for e in entries)  # nothing went back
        (gap,) = [e for e in entries if e.kind == BILLING_GAP]
        assert gap.detail["to"] >= gap.detail["from"]
        starts = [start for start, _ in final.segments]
        ends = [end for _, end in final.segments]
        assert all(s < e for s, e in final.segments) and all(e <= s for e, s in zip(ends, starts[1:]))
