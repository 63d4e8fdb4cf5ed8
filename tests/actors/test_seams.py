"""The concurrency bugs the old actor seams hid, each pinned by a deterministic test.

(Numbers refer to the list in the "Actor seams" issue.)
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import trio
import trio.testing

from actors.connection import Connection
from actors.directory import LOOKUP_ATTEMPTS, call_session, send_to_session
from actors.ports import ConnectionRef, ToCaller
from actors.session import SendChat, SessionHandle, Transition, actor, chat
from actors.session.actor import IDLE_GRACE
from actors.session.chat import chat_frame
from actors.supervise import RestartIntensityExceeded, Supervisor
from domain import metrics
from domain.chat import ChatMessage
from domain.errors import Fenced, Internal, StorageUnavailable
from domain.identity import Identity
from parley_client import RequestError
from storage import messages as sm

ADMIN = Identity(user="admin", is_admin=True)


async def seed(w, session_id: str, count: int) -> None:
    now = w.ctx.clock.now_ms()
    await w.storage.write_many([
        sm.InsertMessage(message=ChatMessage(
            id=uuid.uuid4().hex, session_id=session_id, seq=n, client_id=f"seed-{n}", sender="bob",
            body=f"backlog {n}", created_at=now,
        ))
        for n in range(1, count + 1)
    ])


# 1 -------------------------------------------------------------------------------------


async def test_two_backlogs_on_one_connection_both_arrive_whole(autojump_clock, world):
    """A provider reconnecting to two calls with 600 unread messages in each: both offline
    queues arrive complete and in order, and the connection is not cut as a slow consumer."""
    async with world() as w:
        first, second = await w.create_session(), await w.create_session()
        await seed(w, first, 600)
        await seed(w, second, 600)
        alice, _, side = await w.client("alice")
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: alice.request("join", session=first))
            nursery.start_soon(lambda: alice.request("join", session=second))
        seen: dict[str, list[int]] = {first: [], second: []}
        with trio.fail_after(25):  # the old pacing stalled one backlog for 30 s, then closed 1008
            while len(seen[first]) + len(seen[second]) < 1200:
                event = await alice.next_event("chat.message")
                seen[event["session"]].append(event["seq"])
        assert seen[first] == list(range(1, 601)) and seen[second] == list(range(1, 601))
        assert not side.done.is_set() and trio.current_time() - started < 25


async def test_a_lost_live_delivery_is_filled_from_storage_and_a_repeat_is_dropped(autojump_clock, world):
    """The connection orders chat by seq itself: a gap is filled from storage, a duplicate dropped."""
    async with world() as w:
        sid = await w.create_session()
        alice, _, _ = await w.client("alice")
        bob, _, _ = await w.client("bob")
        await alice.request("join", session=sid)
        await bob.request("join", session=sid)
        await bob.request("chat.send", session=sid, client_id="m1", body="one")
        assert (await alice.next_event("chat.message"))["seq"] == 1
        # seq 2 is stored but its delivery to alice is lost on the way (as across nodes)
        await seed_one(w, sid, seq_hint=2, client_id="lost")
        await bob.request("chat.send", session=sid, client_id="m3", body="three")
        assert [(await alice.next_event("chat.message"))["seq"] for _ in range(2)] == [2, 3]
        # and the same frame delivered twice reaches the client once
        alice_ref = ConnectionRef(id=alice.welcome["connection"], user="alice")
        stored = await w.storage.read(sm.GetMessages(session_id=sid, after_seq=2, limit=1))
        w.ctx.post_office.deliver(alice_ref, chat_frame(sid, stored[0]))
        await alice.request("ping")
        assert alice.pending_events("chat.message") == []


async def seed_one(w, session_id: str, *, seq_hint: int, client_id: str) -> None:
    await w.storage.write(sm.InsertMessage(message=ChatMessage(
        id=uuid.uuid4().hex, session_id=session_id, seq=seq_hint, client_id=client_id, sender="bob",
        body="stored behind the session's back", created_at=w.ctx.clock.now_ms(),
    )))


# 2 -------------------------------------------------------------------------------------


class RetiredDirectory:
    """A directory whose every lookup hands out a handle that has just retired."""

    def __init__(self) -> None:
        self.lookups = 0

    async def lookup(self, session_id: str) -> SessionHandle:
        self.lookups += 1
        send, receive = trio.open_memory_channel(1)
        receive.close()
        return SessionHandle(session_id, send)


async def test_a_session_that_keeps_retiring_is_a_clear_error_never_session_gone():
    directory = RetiredDirectory()
    with pytest.raises(StorageUnavailable):
        await send_to_session(directory, "s", Transition(caller=ADMIN, name="end", reply=ToCaller(call_id=1)))
    assert directory.lookups == LOOKUP_ATTEMPTS


async def test_a_request_to_a_session_that_keeps_retiring_gets_its_reply_and_the_connection_stays(
    autojump_clock, world
):
    async with world() as w:
        sid = await w.create_session()
        w.ctx = dataclasses.replace(w.ctx, directory=RetiredDirectory())
        alice, ws, side = await w.client("alice")
        with pytest.raises(RequestError) as err:
            await alice.request("session.end", session=sid)  # `_to_any`: looked up, retried
        assert err.value.code == "internal" and "restarting" in err.value.frame["message"]
        assert (await alice.request("ping"))["type"] == "ok"
        assert not side.done.is_set()


# 3 -------------------------------------------------------------------------------------


async def test_a_request_taken_behind_a_chat_batch_is_answered_when_the_actor_crashes(
    autojump_clock, world, monkeypatch
):
    async with world() as w:
        sid = await w.create_session()
        alice, _, _ = await w.client("alice")
        await alice.request("join", session=sid)
        handle = await w.supervisor.lookup(sid)

        async def crash(session, batch):
            raise RuntimeError("injected crash while storing a chat batch")

        monkeypatch.setattr(chat, "send", crash)
        alice_ref = ConnectionRef(id=alice.welcome["connection"], user="alice")
        with w.ctx.post_office.call() as (reply_to, answer):
            # queued together: the chat send, then a transition the batch takes out of the mailbox
            handle._mailbox.send_nowait(SendChat(
                caller=Identity(user="alice"), conn_id=alice_ref.id, client_id="c", body="hi", reply=reply_to,
            ))
            with w.ctx.post_office.call() as (start_reply, start_answer):
                handle._mailbox.send_nowait(Transition(caller=ADMIN, name="start", reply=start_reply))
                with trio.fail_after(5):
                    result = await start_answer.receive()
        with pytest.raises(Internal):
            result.unwrap()


# 4 -------------------------------------------------------------------------------------


async def test_an_active_session_that_crashes_is_restarted_and_still_orphaned(autojump_clock, world, monkeypatch):
    async with world(orphan_timeout=60.0) as w:
        sid = await w.create_session()
        await call_session(w.supervisor, w.ctx.post_office, sid,
                           lambda r: Transition(caller=ADMIN, name="start", reply=r))
        alice, _, _ = await w.client("alice")
        await alice.request("join", session=sid)
        crash_next_typing(monkeypatch, times=1)
        with pytest.raises(RequestError):
            await alice.request("typing", session=sid, active=True)
        await trio.testing.wait_all_tasks_blocked()
        assert (await w.supervisor.snapshot()).sessions == (sid,)  # restarted from storage
        await trio.sleep(61)  # nobody joined the new actor: the orphan rule still ends it
        session = await w.storage.read(sm.GetSession(session_id=sid))
        assert (session.state, session.end_reason) == ("ended", "orphaned")


def crash_next_typing(monkeypatch, *, times: int) -> None:
    from actors.session import presence

    left = [times]
    original = presence.typing

    def crash(session, message):
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("injected crash")
        return original(session, message)

    monkeypatch.setattr(presence, "typing", crash)


async def test_past_the_restart_intensity_the_supervisor_escalates(autojump_clock, world, monkeypatch):
    """Crashing on every load: restarted RESTART_LIMIT times, then the supervisor fails."""
    async with world() as w:
        sid = await w.create_session()
        await call_session(w.supervisor, w.ctx.post_office, sid,
                           lambda r: Transition(caller=ADMIN, name="start", reply=r))
        own = Supervisor(
            actor.SessionContext(storage=w.storage, settings=w.settings, clock=w.ctx.clock, delivery=w.ctx.post_office),
            calls=w.ctx.post_office,
        )

        async def crash_on_load(self):
            self.session = await self.storage.read(sm.GetSession(session_id=self.session_id))
            raise RuntimeError("injected crash on load")

        monkeypatch.setattr(actor.SessionActor, "_load", crash_on_load)
        with pytest.raises(BaseExceptionGroup) as group, trio.fail_after(10):
            await own.run(resume=(sid,))
        assert group.group_contains(RestartIntensityExceeded)


# 5 -------------------------------------------------------------------------------------


async def test_an_actor_started_for_a_lookup_that_never_sends_retires(autojump_clock, world):
    async with world() as w:
        sid = await w.create_session()  # scheduled: nothing keeps an idle actor alive
        handle = await w.supervisor.lookup(sid)  # and then the caller is cancelled before sending
        await trio.testing.wait_all_tasks_blocked()
        assert (await w.supervisor.snapshot()).sessions == (sid,)
        await trio.sleep(IDLE_GRACE + 1)
        assert handle.retired
        assert (await w.supervisor.snapshot()).sessions == ()


# 7 -------------------------------------------------------------------------------------


class SilentDirectory:
    """A directory that never answers (a stalled supervisor)."""

    async def lookup(self, session_id: str) -> SessionHandle:
        await trio.sleep_forever()
        raise AssertionError


async def test_admitting_a_connection_waits_on_no_actor(autojump_clock, world):
    """The per-user connection count is taken synchronously: a stalled directory cannot make
    admission time out (the old TooSlowError escaped into the listener's nursery)."""
    async with world(max_connections_per_user=1) as w:
        w.ctx = dataclasses.replace(w.ctx, directory=SilentDirectory())
        alice, _, side = await w.client("alice")
        assert (await alice.request("ping"))["type"] == "ok"
        _, _, second = await w.client("alice")  # welcomed, then refused
        with trio.fail_after(5):
            await second.done.wait()
        assert second.close_codes == [4008]
        assert not side.done.is_set()


# 8 -------------------------------------------------------------------------------------


def test_finish_reasons_merge_and_a_drop_is_never_lost():
    connection = Connection.__new__(Connection)
    connection._finished = None
    connection._scope = trio.CancelScope()
    connection._writer_scope = None  # no writer running
    connection._finish(1000, "closed by client")
    connection._finish(1000, "send failed", dropped=True)  # the same end, seen by another task
    assert connection._finished.dropped and connection._finished.code == 1000
    connection._finish(4008, "heartbeat timeout", dropped=False)
    assert connection._finished.dropped  # a later reason never takes the drop back



class LapsedOwnership:
    """A cluster node whose lease has lapsed: every claim is refused."""

    node = "n1"
    writable = False

    async def claim(self, session_id: str) -> int:
        raise Fenced("this node's lease has lapsed; try again")

    def stopped(self, session_id: str, epoch: int, *, fenced: bool, finished: bool) -> None:
        raise AssertionError("nothing was claimed")


async def test_a_claim_refused_at_load_is_answered_fenced_not_a_crash(autojump_clock, world):
    """In a cluster, a node whose claim is refused (another owner, or its own lease lapsed)
    answers the queued requests with Fenced, which callers (and a takeover's rejoin) retry;
    it used to crash the actor, and the rejoin gave up on the crash's `internal` error."""
    async with world() as w:
        sid = await w.create_session()
        own = Supervisor(
            actor.SessionContext(storage=w.storage, settings=w.settings, clock=w.ctx.clock,
                                 delivery=w.ctx.post_office, ownership=LapsedOwnership()),
            calls=w.ctx.post_office,
        )
        crashes_before = metrics.SESSION_CRASHES._value.get()
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(own.run)
            with pytest.raises((Fenced, StorageUnavailable)):  # both retried, unlike `internal`
                await call_session(handle, w.ctx.post_office, sid,
                                   lambda r: Transition(caller=ADMIN, name="start", reply=r))
            nursery.cancel_scope.cancel()
        assert metrics.SESSION_CRASHES._value.get() == crashes_before
