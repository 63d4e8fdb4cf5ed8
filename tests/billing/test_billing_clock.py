"""The process's billing clock (actors/billing_clock.py) under a fake clock: one wake-up per
due session, last deadline wins, coalescing, full mailboxes, retirement, lateness."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import outcome
import pytest
import trio
import trio.testing

from actors.billing_clock import BUCKET, BillingClock, BillingTimer
from domain.errors import Fenced, StorageUnavailable

from .harness import Peer, world


class FakeStorage:
    """Records each write_many; `refuse` names requests answered with an error; `gate` holds writes."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.refuse: dict[str, Exception] = {}
        self.gate: trio.Event | None = None

    async def write_many(self, requests: list[str], *, timeout: float) -> list[outcome.Outcome]:
        self.calls.append(list(requests))
        if self.gate is not None:
            await self.gate.wait()
        return [outcome.Error(self.refuse[r]) if r in self.refuse else outcome.Value(None) for r in requests]


@asynccontextmanager
async def running_clock(storage: FakeStorage | None = None, **kwargs: float) -> AsyncIterator[BillingClock]:
    async with trio.open_nursery() as nursery:
        clock = await nursery.start(BillingClock(storage, **kwargs).run)  # type: ignore[arg-type]
        yield clock
        nursery.cancel_scope.cancel()


def drain(receive: trio.MemoryReceiveChannel[str]) -> list[str]:
    got = []
    while True:
        try:
            got.append(receive.receive_nowait())
        except trio.WouldBlock:
            return got


def session_timer(clock: BillingClock, size: int = 4, wake: str = "due") -> tuple[
    BillingTimer[str], trio.MemoryReceiveChannel[str]
]:
    send, receive = trio.open_memory_channel[str](size)
    return clock.timer(send, wake), receive


async def test_many_sessions_due_in_one_bucket_get_one_wake_up_each(autojump_clock):
    async with running_clock() as clock:
        middle = (math.floor(trio.current_time() / BUCKET) + 50.5) * BUCKET  # of a bucket 1 s ahead
        timers = [session_timer(clock) for _ in range(500)]
        for i, (timer, _) in enumerate(timers):
            timer.reschedule(middle + (i % 7 - 3) * BUCKET / 10)  # all within one bucket
        assert clock.statistics().buckets == 1
        # a deadline set again and again before it passes is still one wake-up
        for timer, _ in timers[:50]:
            timer.reschedule(timer.deadline)
        await trio.sleep(2)
        assert [len(drain(receive)) for _, receive in timers] == [1] * 500
        assert all(timer.pending for timer, _ in timers)
        stats = clock.statistics()
        assert (stats.posted, stats.armed, stats.buckets, stats.retried) == (500, 0, 0, 0)


async def test_no_second_wake_up_before_the_session_handled_the_first(autojump_clock):
    async with running_clock() as clock:
        timer, receive = session_timer(clock)
        timer.reschedule(trio.current_time() + 1)
        await trio.sleep(1.5)
        timer.reschedule(trio.current_time() + 1)  # set while the wake-up is unhandled: kept
        await trio.sleep(5)
        assert drain(receive) == ["due"]
        assert clock.statistics().armed == 0
        timer.woken()  # the session handled it: the kept deadline (past now) is armed
        await trio.sleep(0.1)
        assert drain(receive) == ["due"]
        timer.woken()
        timer.reschedule(trio.current_time() + 1)
        await trio.sleep(1.1)
        assert drain(receive) == ["due"]


async def test_reschedule_moves_the_wake_up(autojump_clock):
    async with running_clock() as clock:
        t0 = trio.current_time()
        timer, receive = session_timer(clock)
        timer.reschedule(t0 + 1)
        timer.reschedule(t0 + 3)  # later: the last deadline wins
        await trio.sleep_until(t0 + 2.5)
        assert drain(receive) == []
        await trio.sleep_until(t0 + 3 + BUCKET)
        assert drain(receive) == ["due"]
        timer.woken()
        timer.reschedule(t0 + 100)
        timer.reschedule(t0 + 4)  # earlier than the bucket the clock sleeps for
        await trio.sleep_until(t0 + 4 + BUCKET)
        assert drain(receive) == ["due"]


async def test_cancel_removes_the_wake_up(autojump_clock):
    async with running_clock() as clock:
        timer, receive = session_timer(clock)
        timer.reschedule(trio.current_time() + 1)
        timer.cancel()
        assert timer.deadline == math.inf
        assert (clock.statistics().armed, clock.statistics().buckets) == (0, 0)
        await trio.sleep(10)
        assert drain(receive) == []
        assert clock.statistics().posted == 0


async def test_a_full_mailbox_does_not_lose_the_wake_up(autojump_clock):
    async with running_clock() as clock:
        timer, receive = session_timer(clock, size=2)
        send = timer._mailbox
        send.send_nowait("chat")
        send.send_nowait("chat")  # the session is busy: its mailbox is full
        t0 = trio.current_time()
        timer.reschedule(t0 + 1)
        await trio.sleep(1.5)
        assert clock.statistics().retried > 0 and clock.statistics().armed == 1
        assert not timer.pending
        assert await receive.receive() == "chat"  # the session takes one message: room again
        await trio.sleep(2 * BUCKET)
        assert drain(receive) == ["chat", "due"]  # late by about one bucket, not lost
        assert clock.statistics().posted == 1


async def test_a_retired_session_is_forgotten(autojump_clock):
    async with running_clock() as clock:
        timers = [session_timer(clock) for _ in range(3)]
        for timer, _ in timers:
            timer.reschedule(trio.current_time() + 1)
        closed, _ = timers[0]
        closed.close()  # the session actor's `finally`
        closed.close()  # idempotent
        closed.reschedule(trio.current_time() + 1)  # a closed timer arms nothing
        _, gone = timers[1]
        gone.close()  # the session closed its mailbox (retired) without closing its timer
        assert clock.statistics().timers == 2 and clock.statistics().armed == 2
        await trio.sleep(2)
        stats = clock.statistics()
        assert (stats.timers, stats.armed, stats.buckets, stats.posted, stats.forgotten) == (1, 0, 0, 1, 1)
        assert closed._mailbox._closed  # the clock's clone of the mailbox is closed too
        assert clock._buckets == {} and clock._keys == [] and clock._queued == set()


async def test_wake_ups_are_never_early_late_by_less_than_a_bucket_and_in_deadline_order(autojump_clock):
    rng = random.Random(7)
    async with running_clock() as clock, trio.open_nursery() as nursery:
        t0 = trio.current_time()
        woken: list[tuple[float, float, int]] = []  # (deadline, arrival, index)
        send, receive = trio.open_memory_channel[int](1000)

        async def session(i: int, deadline: float) -> None:
            own_send, own_receive = trio.open_memory_channel[int](1)
            timer = clock.timer(own_send, i)
            timer.reschedule(deadline)
            await own_receive.receive()
            woken.append((deadline, trio.current_time(), i))
            timer.close()

        deadlines = [t0 + rng.uniform(0.5, 3.0) for _ in range(300)]
        for i, deadline in enumerate(deadlines):
            nursery.start_soon(session, i, deadline)
        # one shared mailbox shows the order of posting within each bucket
        ordered = [clock.timer(send, i) for i in range(300)]
        for timer, deadline in zip(ordered, deadlines):
            timer.reschedule(deadline)
        await trio.sleep(4)
        assert len(woken) == 300
        for deadline, arrival, _ in woken:
            assert deadline <= arrival < deadline + BUCKET + 1e-9
        posted = drain(receive)
        assert sorted(posted) == list(range(300))
        assert [deadlines[i] for i in posted] == sorted(deadlines)
        assert clock.statistics().timers == 300 and clock.statistics().armed == 0


async def test_checkpoints_handed_over_together_are_written_together(autojump_clock):
    storage = FakeStorage()
    async with running_clock(storage) as clock:
        timers = [session_timer(clock) for _ in range(50)]
        for i, (timer, _) in enumerate(timers):
            timer.checkpoint(f"c{i}")
        timers[3][0].checkpoint("c3'")  # a newer one replaces the waiting one
        await trio.testing.wait_all_tasks_blocked()
        assert len(storage.calls) == 1 and len(storage.calls[0]) == 50
        assert "c3" not in storage.calls[0] and storage.calls[0][-1] == "c3'"
        stats = clock.statistics()
        assert (stats.checkpoints, stats.checkpoint_writes, stats.checkpoints_failed) == (50, 1, 0)
        assert all(drain(receive) == [] for _, receive in timers)  # success is not reported


async def test_checkpoints_handed_over_during_a_write_go_in_the_next_one(autojump_clock):
    storage = FakeStorage()
    storage.gate = trio.Event()
    async with running_clock(storage) as clock:
        first, _ = session_timer(clock)
        second, _ = session_timer(clock)
        first.checkpoint("a1")
        await trio.testing.wait_all_tasks_blocked()
        first.checkpoint("a2")  # while a1 is being written
        second.checkpoint("b1")
        second.discard_checkpoint()  # the session wrote its bill itself
        second.checkpoint("b2")
        storage.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert storage.calls == [["a1"], ["a2", "b2"]]


async def test_a_failed_checkpoint_comes_back_to_its_session_even_through_a_full_mailbox(autojump_clock):
    storage = FakeStorage()
    storage.refuse = {"bad": StorageUnavailable("disk I/O error"), "old": Fenced("another node owns it")}
    async with running_clock(storage) as clock:
        send, receive = trio.open_memory_channel[object](1)
        timer = clock.timer(send, "due", lambda error: ("failed", error))
        fenced, fenced_receive = trio.open_memory_channel[object](4)
        other = clock.timer(fenced, "due", lambda error: ("failed", error))
        send.send_nowait("chat")  # full
        timer.checkpoint("bad")
        other.checkpoint("old")
        gone, _ = session_timer(clock)
        gone.checkpoint("bad")
        gone.close()  # retired: its checkpoint is written, its failure not reported
        await trio.sleep(5 * BUCKET)
        assert len(storage.calls) == 1 and sorted(storage.calls[0]) == ["bad", "bad", "old"]
        [(kind, error)] = drain(fenced_receive)
        assert kind == "failed" and isinstance(error, Fenced)
        assert await receive.receive() == "chat"
        await trio.sleep(2 * BUCKET)
        [(kind, error)] = drain(receive)
        assert kind == "failed" and isinstance(error, StorageUnavailable)
        assert clock.statistics().checkpoints_failed == 3 and clock._failures == {}


async def test_a_storage_that_does_not_answer_fails_the_whole_write(autojump_clock):
    storage = FakeStorage()
    storage.gate = trio.Event()  # never set

    class Slow(FakeStorage):
        async def write_many(self, requests, *, timeout):
            with trio.fail_after(timeout):
                return await storage.write_many(requests, timeout=timeout)

    async with running_clock(Slow(), timeout=2.0) as clock:
        send, receive = trio.open_memory_channel[object](4)
        timer = clock.timer(send, "due", lambda error: error)
        timer.checkpoint("c")
        await trio.sleep(3)
        [error] = drain(receive)
        assert isinstance(error, StorageUnavailable)


def test_a_bucket_must_be_positive():
    with pytest.raises(ValueError):
        BillingClock(bucket=0)


# ------------------------------------------------------------ in the session actors


async def test_every_billing_session_shares_the_one_clock_and_leaves_it_when_retired(autojump_clock):
    async with world(billing_tick=1.0) as w:
        peers = {}
        for i in range(20):
            sid = await w.create_active(payer=f"p{i}", provider=f"q{i}", rate=60)
            peers[sid] = (Peer(f"p{i}"), Peer(f"q{i}"))
            for peer in peers[sid]:
                await w.join(peer, sid)
        clock = w.supervisor_actor.ctx.billing_clock
        assert clock is not None
        await trio.sleep(5.5)
        # no timer task per session: the supervisor's tree is its 20 actors, the one clock
        # and the clock's checkpoint writer
        assert len(descendants(w.supervisor_actor._nursery)) == 20 + 2
        stats = clock.statistics()
        assert stats.timers == 20 and stats.armed == 20 and stats.retried == 0
        # the sessions due together share their checkpoint writes (one per tick here)
        assert stats.checkpoints == 20 * 5 and stats.checkpoint_writes == 5 and stats.checkpoints_failed == 0
        for payer, provider in peers.values():
            for peer in (payer, provider):
                assert [f["billable_ms"] for f in peer.frames("billing")] == [0, 1000, 2000, 3000, 4000, 5000]
        for sid, (payer, _) in peers.items():
            await w.transition(sid, "end", user=payer.user)
        for sid, (payer, provider) in peers.items():
            await w.leave(payer, sid)
            await w.leave(provider, sid)
        await trio.sleep(10)  # idle actors retire
        assert (await w.supervisor.snapshot()).sessions == ()
        stats = clock.statistics()
        assert (stats.timers, stats.armed, stats.buckets) == (0, 0, 0)
        assert len(descendants(w.supervisor_actor._nursery)) == 2


def descendants(nursery: trio.Nursery | None) -> list[trio.lowlevel.Task]:
    assert nursery is not None
    tasks = []
    for task in nursery.child_tasks:
        tasks.append(task)
        for child in task.child_nurseries:
            tasks.extend(descendants(child))
    return tasks


async def test_a_failed_tick_checkpoint_is_written_again_after_storage_retry(autojump_clock, tmp_path):
    from actors.session.billing import STORAGE_RETRY

    from .harness import FlakyBackend

    backend = FlakyBackend(tmp_path / "parley.sqlite3", synchronous="OFF")
    async with world(backend=backend, billing_tick=30.0) as w:
        sid = await w.create_active(rate=60)
        payer, provider = Peer("payer"), Peer("provider")
        await w.join(payer, sid)
        await w.join(provider, sid)
        start = trio.current_time()
        await trio.sleep_until(start + 29)
        backend.failing = True
        await trio.sleep_until(start + 30 + STORAGE_RETRY / 2)  # the tick's checkpoint failed
        backend.failing = False
        assert (await w.stored_billing(sid)).billable_ms == 0
        await trio.sleep_until(start + 30 + STORAGE_RETRY + 2 * BUCKET)
        # written again one STORAGE_RETRY later, not a whole tick later
        assert 29_000 <= (await w.stored_billing(sid)).billable_ms <= 31_000
        assert [f["billable_ms"] for f in payer.frames("billing")] == [0, 30_000]  # no extra push
        assert w.supervisor_actor.ctx.billing_clock.statistics().checkpoints_failed == 1
