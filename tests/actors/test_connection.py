"""The connection actor, driven over in-memory WebSockets under `autojump_clock`:
hello and auth, heartbeat, slow consumer, leave on disconnect, replace-on-rejoin."""

from __future__ import annotations

import time

import jwt
import orjson
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from actors.connection import CLOSE_AUTH, CLOSE_POLICY, CLOSE_SLOW_CONSUMER
from domain import metrics
from parley_client import RequestError
from storage import messages as sm

from .conftest import SECRET, FreezableStream, token


async def closed_code(ws, *, timeout: float = 30) -> int | None:
    """Read until the server closes; the close code it sent."""
    with trio.fail_after(timeout):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code if exc.reason else None


async def next_left(peer, *, timeout: float = 5) -> str:
    """The user of the next `presence` `left` event (skipping `joined` ones)."""
    with trio.fail_after(timeout):
        while True:
            event = await peer.next_event("presence")
            if event["state"] == "left":
                return event["user"]


async def test_no_hello_is_closed_4001_after_hello_timeout(autojump_clock, world):
    async with world(hello_timeout=10.0) as w:
        ws, side = await w.open_ws()
        started = trio.current_time()
        assert await closed_code(ws) == CLOSE_AUTH
        assert 10.0 <= trio.current_time() - started < 11.0
        assert side.close_codes == [CLOSE_AUTH]


async def test_hello_in_time_gets_welcome(autojump_clock, world):
    async with world(hello_timeout=10.0, heartbeat=7.0) as w:
        ws, _ = await w.open_ws()
        await trio.sleep(9.0)
        await ws.send_message(orjson.dumps({"type": "hello", "token": token("alice")}).decode())
        with trio.fail_after(1):
            welcome = orjson.loads(await ws.get_message())
        assert welcome["type"] == "welcome"
        assert welcome["user"] == "alice"
        assert welcome["heartbeat"] == 7.0
        assert isinstance(welcome["connection"], str) and welcome["connection"]


def _bad_tokens() -> dict[str, str]:
    now = int(time.time())
    return {
        "bad signature": jwt.encode({"sub": "alice", "exp": now + 60}, "another-secret-of-sufficient-length!!", algorithm="HS256"),
        "expired": token("alice", ttl=-60),
        "alg none": jwt.encode({"sub": "alice", "exp": now + 60}, None, algorithm="none"),
        "HS512": jwt.encode({"sub": "alice", "exp": now + 60}, SECRET, algorithm="HS512"),
        "no exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
        "no sub": jwt.encode({"exp": now + 60}, SECRET, algorithm="HS256"),
        "garbage": "not-a-jwt",
        "empty": "",
    }


@pytest.mark.parametrize("case", list(_bad_tokens()))
async def test_bad_token_in_hello_is_closed_4001(autojump_clock, world, case):
    async with world() as w:
        ws, side = await w.open_ws()
        await ws.send_message(orjson.dumps({"type": "hello", "token": _bad_tokens()[case]}).decode())
        assert await closed_code(ws, timeout=5) == CLOSE_AUTH
        with trio.fail_after(5):
            await side.done.wait()
        assert (await w.snapshot())["connections"] == {}


@pytest.mark.parametrize("case", ["bad signature", "expired", "alg none", "empty"])
async def test_bad_query_token_is_closed_4001(autojump_clock, world, case):
    async with world() as w:
        ws, _ = await w.open_ws(query_token=_bad_tokens()[case])
        assert await closed_code(ws, timeout=5) == CLOSE_AUTH


async def test_query_token_skips_hello(autojump_clock, world):
    async with world() as w:
        ws, _ = await w.open_ws(query_token=token("alice"))
        with trio.fail_after(1):
            welcome = orjson.loads(await ws.get_message())
        assert (welcome["type"], welcome["user"]) == ("welcome", "alice")


@pytest.mark.parametrize("first", [{"type": "ping"}, {"type": "join", "session": "s"}, "not json", {"token": "x"}])
async def test_first_frame_other_than_hello_is_closed_4001(autojump_clock, world, first):
    async with world() as w:
        ws, _ = await w.open_ws()
        await ws.send_message(first if isinstance(first, str) else orjson.dumps(first).decode())
        assert await closed_code(ws, timeout=5) == CLOSE_AUTH


async def test_live_client_survives_many_heartbeats(autojump_clock, world):
    async with world(heartbeat=5.0) as w:
        alice, _, side = await w.client("alice")
        await trio.sleep(120)  # 24 intervals: trio-websocket answers every ping
        assert not side.done.is_set()
        assert (await alice.request("ping"))["type"] == "ok"


async def test_dead_peer_is_closed_after_two_intervals_and_leaves(autojump_clock, world):
    async with world(heartbeat=5.0) as w:
        session = await w.create_session()
        frozen: list[FreezableStream] = []

        def freezable(stream):
            frozen.append(FreezableStream(stream))
            return frozen[0]

        alice, _, alice_side = await w.client("alice", wrap=freezable)
        bob, _, _ = await w.client("bob")
        await alice.request("join", session=session)
        await bob.request("join", session=session)
        await trio.testing.wait_all_tasks_blocked()
        went_dead = trio.current_time()
        frozen[0].freeze()
        left = await bob.next_event("presence", timeout=30)
        gone_after = trio.current_time() - went_dead
        assert left == {"type": "presence", "session": session, "user": "alice", "state": "left"}
        # silent for two intervals (measured from the last pong, which is at most one interval old)
        assert 5.0 <= gone_after <= 10.0 + 0.5
        with trio.fail_after(5):
            await alice_side.done.wait()
        assert alice_side.close_codes == [CLOSE_POLICY]
        timeline = await w.storage.read(sm.GetTimeline(session_id=session))
        dropped = [e for e in timeline if e.kind == "dropped"]
        assert [e.actor for e in dropped] == ["alice"]
        assert "last_alive" in dropped[0].detail
        # bob goes on
        assert (await bob.request("ping"))["type"] == "ok"
        assert (await w.snapshot())["connections"] == {"bob": 1}


async def test_slow_consumer_is_closed_1008_and_others_are_unaffected(autojump_clock, world):
    async with world(outbox_frames=8, frames_per_second=1000.0, frame_burst=1000) as w:
        session = await w.create_session(guests=("carol",))
        slow_ws, slow_side = await w.open_ws(bounded=True, queue=1)
        await slow_ws.send_message(orjson.dumps({"type": "hello", "token": token("alice")}).decode())
        with trio.fail_after(1):
            assert orjson.loads(await slow_ws.get_message())["type"] == "welcome"
        await slow_ws.send_message(orjson.dumps({"type": "join", "session": session, "ref": "j"}).decode())
        with trio.fail_after(1):
            assert orjson.loads(await slow_ws.get_message())["type"] == "ok"
        # from here on alice reads nothing
        bob, _, _ = await w.client("bob")
        carol, _, _ = await w.client("carol")
        await bob.request("join", session=session)
        await carol.request("join", session=session)
        slow_before = metrics.SLOW_CONSUMERS._value.get()
        with trio.fail_after(30):
            sent = 0
            while True:  # signal alice until the session no longer has her
                try:
                    await bob.request("signal", session=session, to="alice", kind="candidate", payload={"n": sent})
                except RequestError as exc:
                    assert exc.code == "not_joined"
                    break
                sent += 1
                assert sent < 200, "the slow consumer was never cut off"
            await slow_side.done.wait()
        assert sent > 8  # it took a full outbox (plus what the pipe holds), not less
        assert slow_side.close_codes == [CLOSE_SLOW_CONSUMER]
        assert metrics.SLOW_CONSUMERS._value.get() == slow_before + 1
        for peer in (bob, carol):
            assert await next_left(peer) == "alice"
        # the others are unaffected
        await bob.request("signal", session=session, to="carol", kind="offer", payload={"ok": True})
        got = await carol.next_event("signal", timeout=5)
        assert (got["from"], got["payload"]) == ("bob", {"ok": True})
        with pytest.raises(RequestError) as err:
            await bob.request("signal", session=session, to="alice", kind="offer", payload={})
        assert err.value.code == "not_joined"
        # the stuck client finds its connection gone when it reads again
        assert await closed_code(slow_ws, timeout=10) is not None


async def test_clean_disconnect_leaves_every_session(autojump_clock, world):
    async with world() as w:
        first, second = await w.create_session(), await w.create_session()
        alice, alice_ws, alice_side = await w.client("alice")
        bob, _, _ = await w.client("bob")
        for session in (first, second):
            await alice.request("join", session=session)
            await bob.request("join", session=session)
        await alice_ws.aclose()
        with trio.fail_after(5):
            await alice_side.done.wait()
        left = {(e["session"], e["user"], e["state"]) for e in [await bob.next_event("presence"), await bob.next_event("presence")]}
        assert left == {(first, "alice", "left"), (second, "alice", "left")}
        await bob.request("leave", session=first)
        await bob.request("leave", session=second)
        await trio.testing.wait_all_tasks_blocked()
        snapshot = await w.snapshot()
        assert snapshot["sessions"] == []  # scheduled sessions nobody is in retire
        assert snapshot["connections"] == {"bob": 1}
        timeline = await w.storage.read(sm.GetTimeline(session_id=first))
        assert [(e.kind, e.actor) for e in timeline if e.kind in ("joined", "left")] == [
            ("joined", "alice"), ("joined", "bob"), ("left", "alice"), ("left", "bob"),
        ]


async def test_rejoin_replaces_older_connection(autojump_clock, world):
    async with world() as w:
        session = await w.create_session()
        old, old_ws, old_side = await w.client("alice")
        bob, _, _ = await w.client("bob")
        await old.request("join", session=session)
        await bob.request("join", session=session)
        new, _, _ = await w.client("alice")
        joined = await new.request("join", session=session)
        assert joined["participants"] == ["alice", "bob"]
        assert await old.next_event("replaced") == {"type": "replaced", "session": session}
        # the old connection is no longer a member, but stays open
        with pytest.raises(RequestError) as err:
            await old.request("signal", session=session, to="bob", kind="offer", payload={})
        assert err.value.code == "not_joined"
        await bob.request("signal", session=session, to="alice", kind="offer", payload={"to": "new"})
        assert (await new.next_event("signal"))["payload"] == {"to": "new"}
        # closing the replaced connection does not take the new one out of the session
        bob_presence_before = len(bob.pending_events("presence"))
        await old_ws.aclose()
        with trio.fail_after(5):
            await old_side.done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert [e for e in bob.pending_events("presence")[bob_presence_before:] if e["state"] == "left"] == []
        await bob.request("signal", session=session, to="alice", kind="answer", payload={"still": "here"})
        assert (await new.next_event("signal"))["payload"] == {"still": "here"}
        assert old.pending_events("signal") == []


# ---------------------------------------------------------------- the heartbeat wheel


def _count_pings(monkeypatch) -> list[float]:
    """Trio times of every server ping (all connections)."""
    from gateway.listener import _ServerWebSocket

    pings: list[float] = []
    original = _ServerWebSocket.ping_nowait

    def counting(self) -> None:
        pings.append(trio.current_time())
        original(self)

    monkeypatch.setattr(_ServerWebSocket, "ping_nowait", counting)
    return pings


async def test_a_silent_connection_leaves_at_its_last_frame_exactly(autojump_clock, world):
    """Dropped after two intervals with no frame and no pong: closed 4008, and the session
    hears its last-alive instant (its last frame here: it never answered a ping)."""
    from domain.clock import iso

    async with world(heartbeat=5.0) as w:
        session = await w.create_session()
        frozen: list[FreezableStream] = []

        def freezable(stream):
            frozen.append(FreezableStream(stream))
            return frozen[0]

        alice, _, alice_side = await w.client("alice", wrap=freezable)
        bob, _, _ = await w.client("bob")
        await bob.request("join", session=session)
        await trio.sleep(3.7)
        last_frame = trio.current_time()
        await alice.request("join", session=session)
        frozen[0].freeze()
        left = await bob.next_event("presence", timeout=30)
        while left["state"] != "left":
            left = await bob.next_event("presence", timeout=30)
        assert left["user"] == "alice"
        assert 2 * 5.0 <= trio.current_time() - last_frame <= 2 * 5.0 + 0.5
        with trio.fail_after(5):
            await alice_side.done.wait()
        assert alice_side.close_codes == [CLOSE_POLICY]
        timeline = await w.storage.read(sm.GetTimeline(session_id=session))
        dropped = [e for e in timeline if e.kind == "dropped"]
        assert [e.detail["last_alive"] for e in dropped] == [iso(w.ctx.clock.to_wall_ms(last_frame))]


async def test_a_connection_sending_frames_is_not_pinged(autojump_clock, world, monkeypatch):
    pings = _count_pings(monkeypatch)
    async with world(heartbeat=5.0) as w:
        alice, _, side = await w.client("alice")
        for _ in range(30):  # a frame every 2 s for a minute: never silent for an interval
            await trio.sleep(2.0)
            assert (await alice.request("ping"))["type"] == "ok"
        assert pings == []
        quiet_from = trio.current_time()
        await trio.sleep(5.0 + 0.5)  # now silent for an interval: pinged, and it answers
        assert len(pings) == 1 and 5.0 <= pings[0] - quiet_from <= 5.0 + 0.5
        await trio.sleep(60)
        assert not side.done.is_set()


async def test_an_idle_members_pongs_are_what_its_session_reads_and_wake_it_not(autojump_clock, world, monkeypatch):
    """Billing never checkpoints past the last instant a member was known alive. In one
    process the session reads that instant from the connection (through the post office)
    when it needs it, so an idle but answering member's pongs keep it current without a
    `MemberAlive` waking the session each interval."""
    from actors.ports import ConnectionRef
    from actors.session import MemberAlive, presence

    heard: list[float] = []
    real_alive = presence.alive

    def spying(s, message: MemberAlive) -> None:
        heard.append(trio.current_time())
        real_alive(s, message)

    monkeypatch.setattr(presence, "alive", spying)
    async with world(heartbeat=5.0) as w:
        session = await w.create_session()
        alice, _, _ = await w.client("alice")
        await alice.request("join", session=session)
        ref = ConnectionRef(id=alice.welcome["connection"], user="alice", is_admin=False)
        for _ in range(12):  # a minute of silence from alice's side, but for her pongs
            await trio.sleep(5.0)
            last_alive = w.ctx.post_office.last_alive(ref)
            assert last_alive is not None and w.ctx.clock.now_ms() - last_alive <= 5_500
        assert heard == []


async def test_a_socket_that_takes_no_ping_holds_up_nobody_else(autojump_clock, world, monkeypatch):
    """Alice stops reading and her socket fills up; her ping cannot be written. Bob is
    pinged on time all along and stays; alice is dropped two intervals after her last frame."""
    pings = _count_pings(monkeypatch)
    async with world(heartbeat=5.0, frames_per_second=1000.0, frame_burst=1000) as w:
        session = await w.create_session()
        frozen: list[FreezableStream] = []

        def freezable(stream):
            frozen.append(FreezableStream(stream))
            return frozen[0]

        alice, _, alice_side = await w.client("alice", wrap=freezable, bounded=True)
        bob, _, bob_side = await w.client("bob")
        await alice.request("join", session=session)
        await bob.request("join", session=session)
        frozen[0].freeze()
        went_quiet = trio.current_time()
        for i in range(8):  # ~8 KiB for alice: more than her socket holds
            await bob.request("signal", session=session, to="alice", kind="candidate", payload={"c": "x" * 1000, "i": i})
        await trio.sleep(30)
        assert alice_side.done.is_set() and alice_side.close_codes == [CLOSE_POLICY]
        assert not bob_side.done.is_set()
        assert len([t for t in pings if t > went_quiet]) >= 5  # bob's, every interval
        del alice


async def test_graceful_shutdown_closes_every_connection_1001_and_late_ones_too(autojump_clock, world):
    async with world() as w:
        session = await w.create_session()
        alice, alice_ws, alice_side = await w.client("alice")
        bob, bob_ws, bob_side = await w.client("bob")
        await alice.request("join", session=session)
        w.ctx.shutting_down.set()
        w.ctx.heartbeat.shut_down()
        with trio.fail_after(5):
            await alice_side.done.wait()
            await bob_side.done.wait()
        assert alice_side.close_codes == [1001] and bob_side.close_codes == [1001]
        late, _, late_side = await w.client("carol")  # welcomed after the walk: closed at once
        with trio.fail_after(5):
            await late_side.done.wait()
        assert late_side.close_codes == [1001]
        assert len(w.ctx.heartbeat) == 0
        timeline = await w.storage.read(sm.GetTimeline(session_id=session))
        assert [e.detail.get("reason") for e in timeline if e.kind == "left"] == ["closed"]


def _writer_tasks() -> int:
    """Connection writer tasks running in this Trio run."""
    count, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += task.name.endswith("Connection._writer")
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def test_an_idle_connection_has_no_writer_task(autojump_clock, world):
    """A writer runs only while something is queued for the socket (issue 13: an idle
    connection costs no task of its own beyond its reader)."""
    async with world() as w:
        session = await w.create_session()
        alice, _, _ = await w.client("alice")
        bob, _, _ = await w.client("bob")
        await alice.request("join", session=session)
        await bob.request("join", session=session)
        await trio.testing.wait_all_tasks_blocked()
        assert _writer_tasks() == 0
        # traffic starts writers (memory streams: nothing is written at once) and they end
        for n in range(20):
            await bob.request("signal", session=session, to="alice", kind="candidate", payload={"n": n})
        for n in range(20):
            assert (await alice.next_event("signal", timeout=5))["payload"] == {"n": n}  # in order
        await trio.testing.wait_all_tasks_blocked()
        assert _writer_tasks() == 0


async def test_a_crashing_writer_closes_its_connection_1011_and_nothing_else(autojump_clock, world, monkeypatch):
    """The writer runs in the socket's nursery, not the connection's task: its crash is
    caught at the actor boundary (logged, 1011, leaves its sessions) like the reader's."""
    from actors import connection as conn_module

    async with world() as w:
        session = await w.create_session()
        alice, _, alice_side = await w.client("alice")
        bob, _, _ = await w.client("bob")
        await alice.request("join", session=session)
        await bob.request("join", session=session)
        real = conn_module.Connection._send_plain

        async def crash_for_alice(self, first):
            if self.ref.user == "alice":
                raise RuntimeError("a bug in the writer")
            await real(self, first)

        monkeypatch.setattr(conn_module.Connection, "_send_plain", crash_for_alice)
        await alice.send_raw({"type": "ping", "ref": "p"})
        with trio.fail_after(5):
            await alice_side.done.wait()
        assert alice_side.close_codes == [1011]
        assert await next_left(bob) == "alice"
        assert (await bob.request("ping"))["type"] == "ok"
        assert (await w.snapshot())["connections"] == {"bob": 1}
