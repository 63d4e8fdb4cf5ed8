"""Signaling's hot path: connections relay `signal` by the session's routing snapshot.

The session actor still decides every join and leave; these tests pin that relaying
without the hop through it keeps every rule a client can see.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors.session import chat
from parley_client import RequestError


async def test_signals_flow_while_the_session_waits_on_storage(autojump_clock, world, monkeypatch):
    """A session busy with a slow write (a chat message on a stalled disk) does not hold
    up the call's signaling: offers and answers do not queue behind its mailbox."""
    async with world() as w:
        sid = await w.create_session()
        alice, _, _ = await w.client("alice")
        bob, _, _ = await w.client("bob")
        await alice.request("join", session=sid)
        await bob.request("join", session=sid)

        disk_back = trio.Event()
        original = chat.send

        async def stalled_send(session, batch):
            await disk_back.wait()
            await original(session, batch)

        monkeypatch.setattr(chat, "send", stalled_send)
        async with trio.open_nursery() as nursery:
            acks: list[dict] = []

            async def send_chat() -> None:
                acks.append(await alice.request("chat.send", session=sid, client_id="c1", body="hello", timeout=60))

            nursery.start_soon(send_chat)
            await trio.testing.wait_all_tasks_blocked()
            await alice.request("signal", session=sid, to="bob", kind="offer", payload={"sdp": "v=0"}, timeout=5)
            offer = await bob.next_event("signal", timeout=5)
            await bob.request("signal", session=sid, to="alice", kind="answer", payload={"sdp": "v=1"}, timeout=5)
            answer = await alice.next_event("signal", timeout=5)
            assert acks == []  # the chat message is still waiting on the disk
            disk_back.set()
        assert (offer["from"], offer["kind"], offer["payload"]) == ("alice", "offer", {"sdp": "v=0"})
        assert (answer["from"], answer["kind"]) == ("bob", "answer")
        assert acks[0]["seq"] == 1


async def test_a_relayed_signal_follows_joins_leaves_and_replacements(autojump_clock, world):
    async with world() as w:
        sid = await w.create_session()
        alice, _, _ = await w.client("alice")
        bob, _, _ = await w.client("bob")
        await alice.request("join", session=sid)

        with pytest.raises(RequestError) as refused:  # bob is not there yet
            await alice.request("signal", session=sid, to="bob", kind="offer", payload={})
        assert refused.value.code == "not_joined"

        await bob.request("join", session=sid)
        await alice.request("signal", session=sid, to="bob", kind="offer", payload={"n": 1})
        assert (await bob.next_event("signal"))["payload"] == {"n": 1}

        newer_bob, _, _ = await w.client("bob")  # a second tab replaces the first
        await newer_bob.request("join", session=sid)
        assert (await bob.next_event("replaced"))["session"] == sid
        await alice.request("signal", session=sid, to="bob", kind="candidate", payload={"n": 2})
        assert (await newer_bob.next_event("signal"))["payload"] == {"n": 2}
        await trio.testing.wait_all_tasks_blocked()
        assert bob.pending_events("signal") == []

        with pytest.raises(RequestError) as refused:  # the replaced connection is no longer in the call
            await bob.request("signal", session=sid, to="alice", kind="offer", payload={})
        assert refused.value.code == "not_joined"

        await newer_bob.request("leave", session=sid)
        with pytest.raises(RequestError) as refused:
            await alice.request("signal", session=sid, to="bob", kind="hangup", payload={})
        assert refused.value.code == "not_joined"
        with pytest.raises(RequestError) as refused:  # and bob, having left, cannot signal either
            await newer_bob.request("signal", session=sid, to="alice", kind="offer", payload={})
        assert refused.value.code == "not_joined"
