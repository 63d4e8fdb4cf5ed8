"""Races between connections and session actors, with seeded interleavings under
`autojump_clock`: concurrent join/leave churn, a signal racing the receiver's leave,
and a session actor crashing in the middle of a signal."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from actors.session import presence
from domain import metrics
from parley_client import RequestError

SEEDS = [1, 2, 3, 5, 8]


async def jitter(rng: random.Random) -> None:
    """A few scheduling points or a short fake-clock sleep, as the seed decides."""
    choice = rng.random()
    if choice < 0.4:
        for _ in range(rng.randrange(1, 6)):
            await trio.lowlevel.checkpoint()
    elif choice < 0.8:
        await trio.sleep(rng.random() * 0.01)


@pytest.mark.parametrize("seed", SEEDS)
async def test_concurrent_join_leave_churn_ends_consistent(autojump_clock, world, seed):
    rng = random.Random(seed)
    async with world(frames_per_second=10_000.0, frame_burst=10_000) as w:
        session = await w.create_session(guests=("carol",))
        final: dict[str, bool] = {}

        async def churn(user: str, rounds: int) -> None:
            client, ws, side = await w.client(user)
            joined = False
            for _ in range(rounds):
                action = rng.random()
                if action < 0.1:  # drop the connection and come back on a new one
                    await ws.aclose()
                    with trio.fail_after(5):
                        await side.done.wait()
                    client, ws, side = await w.client(user)
                    joined = False
                elif joined:
                    await client.request("leave", session=session)
                    joined = False
                else:
                    reply = await client.request("join", session=session)
                    assert user in reply["participants"]
                    joined = True
                await jitter(rng)
            final[user] = joined

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(churn, "alice", 60)
                nursery.start_soon(churn, "bob", 60)
            await trio.testing.wait_all_tasks_blocked()
            carol, _, _ = await w.client("carol")
            reply = await carol.request("join", session=session)
        expected = sorted([u for u, joined in final.items() if joined] + ["carol"])
        assert reply["participants"] == expected, (final, reply["participants"])
        await carol.request("leave", session=session)
        snapshot = await w.snapshot()
        assert snapshot["connections"] == {"alice": 1, "bob": 1, "carol": 1}
        if not any(final.values()):
            await trio.testing.wait_all_tasks_blocked()
            assert (await w.snapshot())["sessions"] == []  # nobody left in it: the actor retired


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("how", ["leave", "disconnect"])
async def test_signal_while_the_receiver_leaves(autojump_clock, world, seed, how):
    rng = random.Random(seed)
    async with world() as w:
        session = await w.create_session()
        alice, _, _ = await w.client("alice")
        await alice.request("join", session=session)
        outcomes: list[str] = []
        for _ in range(15):
            bob, bob_ws, bob_side = await w.client("bob")
            await bob.request("join", session=session)
            result: dict[str, object] = {}

            async def send_signal() -> None:
                await jitter(rng)
                try:
                    await alice.request("signal", session=session, to="bob", kind="offer", payload={"n": 1}, timeout=5)
                    result["signal"] = "ok"
                except RequestError as exc:
                    result["signal"] = exc.code

            async def go_away() -> None:
                await jitter(rng)
                if how == "leave":
                    await bob.request("leave", session=session, timeout=5)
                else:
                    await bob_ws.aclose()
                    await bob_side.done.wait()

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_signal)
                    nursery.start_soon(go_away)
            assert result["signal"] in ("ok", "not_joined")
            outcomes.append(result["signal"])  # type: ignore[arg-type]
            # alice sees bob leave exactly once, and the session still works for her
            with trio.fail_after(5):
                while True:
                    event = await alice.next_event("presence")
                    if event["state"] == "left":
                        assert event["user"] == "bob"
                        break
            assert (await alice.request("ping"))["type"] == "ok"
            if how == "leave":
                await bob_ws.aclose()
            assert alice.pending_events("error") == []
        await trio.testing.wait_all_tasks_blocked()
        assert (await w.snapshot())["sessions"] == [session]  # alice is still in it
        assert len(outcomes) == 15


async def test_session_crash_mid_request_is_contained(autojump_clock, world, monkeypatch):
    async with world() as w:
        crashing, other = await w.create_session(), await w.create_session()
        alice, _, _ = await w.client("alice")
        bob, _, _ = await w.client("bob")
        for session in (crashing, other):
            await alice.request("join", session=session)
            await bob.request("join", session=session)

        original = presence.typing
        armed = {crashing}

        def crash_once(session, message):
            if session.session_id in armed:
                armed.discard(session.session_id)
                raise RuntimeError("injected crash in the middle of a request")
            return original(session, message)

        monkeypatch.setattr(presence, "typing", crash_once)
        crashes_before = metrics.SESSION_CRASHES._value.get()
        with pytest.raises(RequestError) as err:
            await alice.request("typing", session=crashing, active=True, timeout=5)
        assert err.value.code == "internal"  # the request in flight is answered, not left hanging
        for peer in (alice, bob):
            event = await peer.next_event("error", timeout=5)
            assert (event["code"], event["session"]) == ("internal", crashing)
            assert "ref" not in event
        assert metrics.SESSION_CRASHES._value.get() == crashes_before + 1
        assert bob.pending_events("typing") == []

        # the other session and both connections go on
        await alice.request("signal", session=other, to="bob", kind="offer", payload={"still": "up"})
        got = await bob.next_event("signal")
        assert (got["session"], got["payload"]) == (other, {"still": "up"})

        # the crashed session is no longer joined, and can be joined again
        with pytest.raises(RequestError) as err:
            await alice.request("signal", session=crashing, to="bob", kind="offer", payload={})
        assert err.value.code == "not_joined"
        assert (await alice.request("join", session=crashing))["participants"] == ["alice"]
        assert (await bob.request("join", session=crashing))["participants"] == ["alice", "bob"]
        await alice.request("signal", session=crashing, to="bob", kind="answer", payload={"again": True})
        got = await bob.next_event("signal")
        assert (got["session"], got["payload"]) == (crashing, {"again": True})
        await trio.testing.wait_all_tasks_blocked()
        assert sorted((await w.snapshot())["sessions"]) == sorted([crashing, other])
