"""What a session actor knows once loaded: the chat marks it keeps in memory must say what
storage says, so the offline queue after a join starts right after the acknowledged mark
(no gap, no duplicate), whether the actor loaded it or raised it itself."""

from __future__ import annotations

import pytest
import trio

from actors.session.fencing import SessionStorage
from parley_client import RequestError
from storage import messages as sm


async def _send(client, sid: str, count: int) -> None:
    for n in range(1, count + 1):
        await client.request("chat.send", session=sid, client_id=str(n), body=f"m{n}")


async def _rejoin_backlog(w, user: str, sid: str) -> list[int]:
    """Connect as `user`, join, and return the seqs of the offline queue that follows the ok."""
    client, _, _ = await w.client(user)
    await client.send_raw({"type": "join", "ref": "j", "session": sid})
    first = await client.next_event()
    assert first["type"] == "ok" and first["ref"] == "j", first
    await client.request("ping")  # the backlog, if any, came before this answer
    return [m["seq"] for m in client.pending_events("chat.message")]


async def test_marks_stored_before_the_actor_started_shape_the_first_join(autojump_clock, world):
    with trio.fail_after(10):
        async with world() as w:
            sid = await w.create_session()
            alice, alice_ws, _ = await w.client("alice")
            await alice.request("join", session=sid)
            await _send(alice, sid, 3)
            await w.storage.write(sm.RaiseMark(session_id=sid, user="bob", kind="delivered", seq=2))
            await alice_ws.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert (await w.supervisor.snapshot()).sessions == ()  # retired: the next join loads it
            assert await _rejoin_backlog(w, "bob", sid) == [3]


async def test_a_receipt_raised_through_the_live_session_shapes_the_next_join(autojump_clock, world):
    with trio.fail_after(10):
        async with world() as w:
            sid = await w.create_session()
            alice, _, _ = await w.client("alice")
            await alice.request("join", session=sid)
            assert await _rejoin_backlog(w, "bob", sid) == []
            await _send(alice, sid, 4)
            bob, bob_ws, _ = await w.client("bob")
            await bob.request("join", session=sid)
            await bob.request("chat.receipt", session=sid, kind="read", seq=3)
            await bob_ws.aclose()
            assert await _rejoin_backlog(w, "bob", sid) == [4]  # the session stayed up (alice)


async def test_a_receipt_stored_whose_answer_timed_out_still_counts_at_the_next_join(
    autojump_clock, world, monkeypatch
):
    """The write committed but its requester gave up waiting: the session cannot know which
    mark storage holds, so the next join of that user must not trust what it remembers."""
    with trio.fail_after(10):
        async with world() as w:
            sid = await w.create_session()
            alice, _, _ = await w.client("alice")
            await alice.request("join", session=sid)
            await _send(alice, sid, 4)
            bob, bob_ws, _ = await w.client("bob")
            await bob.request("join", session=sid)
            await bob.request("chat.receipt", session=sid, kind="delivered", seq=1)
            write = SessionStorage.write

            async def stored_then_timed_out(self, request, **kwargs):
                result = await write(self, request, **kwargs)
                if isinstance(request, sm.RaiseMark):
                    raise trio.TooSlowError
                return result

            monkeypatch.setattr(SessionStorage, "write", stored_then_timed_out)
            with pytest.raises(RequestError):
                await bob.request("chat.receipt", session=sid, kind="delivered", seq=3)
            monkeypatch.undo()
            await bob_ws.aclose()
            assert await _rejoin_backlog(w, "bob", sid) == [4]


async def test_lookups_share_a_serving_actor_and_one_after_it_retired_starts_another(autojump_clock, world):
    from actors.session.actor import IDLE_GRACE

    with trio.fail_after(30):
        async with world() as w:
            sid = await w.create_session()
            first = await w.supervisor.lookup(sid)
            assert await w.supervisor.lookup(sid) is first
            await trio.sleep(IDLE_GRACE + 1)
            assert first.retired
            again = await w.supervisor.lookup(sid)
            assert again is not first and not again.retired
            assert (await w.supervisor.snapshot()).sessions == (sid,)


async def test_joins_are_on_the_timeline_in_order_the_one_opening_billing_before_its_start(autojump_clock, world):
    from actors.directory import call_session
    from actors.session import Transition
    from domain.identity import Identity

    with trio.fail_after(10):
        async with world() as w:
            sid = await w.create_session()
            await call_session(w.supervisor, w.ctx.post_office, sid,
                               lambda r: Transition(caller=Identity(user="admin", is_admin=True), name="start", reply=r))
            alice, _, _ = await w.client("alice")
            await alice.request("join", session=sid)
            await trio.sleep(1)
            bob, _, _ = await w.client("bob")
            await bob.request("join", session=sid)
            await bob.request("ping")
            await trio.testing.wait_all_tasks_blocked()
            timeline = await w.storage.read(sm.GetTimeline(session_id=sid))
    kinds = [(e.kind, e.actor) for e in timeline]
    assert kinds == [("created", "admin"), ("started", "admin"), ("joined", "alice"), ("joined", "bob"),
                     ("billing_started", "server")]
    assert timeline[3].at == timeline[4].at == timeline[2].at + 1000


def test_a_cursor_is_taken_at_once_only_with_no_backlog():
    from actors.offline_queue import OfflineQueue
    from actors.ports import ChatCursor, ChatFrame

    async def never(*_):
        raise AssertionError("nothing is sent or read for a cursor taken at once")

    queue = OfflineQueue(None, never, never)  # type: ignore[arg-type]
    assert not queue.cursor_nowait(ChatCursor(session_id="s", after_seq=2, last_seq=5))  # 3..5 to stream
    assert queue.in_order(ChatFrame(session_id="s", seq=9, text="x"))  # nothing was taken
    assert queue.cursor_nowait(ChatCursor(session_id="s", after_seq=5, last_seq=5))
    assert queue.in_order(ChatFrame(session_id="s", seq=6, text=None))
    assert not queue.in_order(ChatFrame(session_id="s", seq=7, text=None))


async def test_two_lookups_racing_for_a_session_share_its_actor(autojump_clock, world):
    with trio.fail_after(10):
        async with world() as w:
            sid = await w.create_session()
            found = []

            async def look() -> None:
                await trio.lowlevel.checkpoint()  # both start before either looks
                found.append(await w.supervisor.lookup(sid))

            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(look)
            first, second = found
            assert first is second
            assert (await w.supervisor.snapshot()).sessions == (sid,)
