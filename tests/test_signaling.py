"""Create → join → offer/answer/candidate/hangup through a real server and real WebSockets."""

from __future__ import annotations

import orjson
import pytest
import trio
import trio_websocket

from parley_client import RequestError


async def test_signals_are_relayed_with_from(server):
    session = await server.create_session()
    async with server.client("alice") as alice, server.client("bob") as bob:
        joined = await alice.request("join", session=session["id"])
        assert joined["session"]["id"] == session["id"]
        assert joined["participants"] == ["alice"]
        assert joined["last_seq"] == 0
        joined = await bob.request("join", session=session["id"])
        assert joined["participants"] == ["alice", "bob"]
        presence = await alice.next_event("presence")
        assert presence == {"type": "presence", "session": session["id"], "user": "bob", "state": "joined"}

        offer = {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}
        await alice.request("signal", session=session["id"], to="bob", kind="offer", payload=offer)
        got = await bob.next_event("signal")
        assert got == {"type": "signal", "session": session["id"], "from": "alice", "kind": "offer", "payload": offer}

        for kind, payload in [("answer", {"sdp": "x"}), ("candidate", {"candidate": "c", "sdpMid": "0"}), ("hangup", None)]:
            await bob.request("signal", session=session["id"], to="alice", kind=kind, payload=payload)
            got = await alice.next_event("signal")
            assert (got["from"], got["kind"], got["payload"]) == ("bob", kind, payload)

        await bob.request("leave", session=session["id"])
        left = await alice.next_event("presence")
        assert (left["user"], left["state"]) == ("bob", "left")
        with pytest.raises(RequestError) as err:
            await alice.request("signal", session=session["id"], to="bob", kind="offer", payload={})
        assert err.value.code == "not_joined"


async def test_signal_requires_both_joined(server):
    session = await server.create_session()
    async with server.client("alice") as alice:
        with pytest.raises(RequestError) as err:
            await alice.request("signal", session=session["id"], to="bob", kind="offer", payload={})
        assert err.value.code == "not_joined"
        await alice.request("join", session=session["id"])
        with pytest.raises(RequestError) as err:
            await alice.request("signal", session=session["id"], to="bob", kind="offer", payload={})
        assert err.value.code == "not_joined"


async def test_non_participant_is_forbidden_and_unknown_is_not_found(server):
    session = await server.create_session()
    async with server.client("mallory") as mallory:
        with pytest.raises(RequestError) as err:
            await mallory.request("join", session=session["id"])
        assert err.value.code == "forbidden"
        with pytest.raises(RequestError) as err:
            await mallory.request("join", session="no-such-session")
        assert err.value.code == "not_found"
        # the connection is still usable
        assert (await mallory.request("ping"))["type"] == "ok"


async def test_newer_connection_replaces_older(server):
    session = await server.create_session()
    async with server.client("alice") as old, server.client("bob") as bob:
        await old.request("join", session=session["id"])
        await bob.request("join", session=session["id"])
        async with server.client("alice") as new:
            await new.request("join", session=session["id"])
            replaced = await old.next_event("replaced")
            assert replaced == {"type": "replaced", "session": session["id"]}
            await bob.request("signal", session=session["id"], to="alice", kind="offer", payload={"n": 1})
            assert (await new.next_event("signal"))["payload"] == {"n": 1}
            with pytest.raises(RequestError) as err:
                await old.request("signal", session=session["id"], to="bob", kind="offer", payload={})
            assert err.value.code == "not_joined"
            await trio.sleep(0.05)
            assert old.pending_events("signal") == []


async def test_signals_to_a_reader_that_stalls_arrive_whole_and_in_order(make_server):
    """Frames are written straight to the target's socket when its writer is idle; once the
    socket is full the rest queues behind the bytes already accepted. Megabytes of signals
    to a peer that stops reading arrive intact and in order when it reads again."""
    server = await make_server(frames_per_second=1000.0, frame_burst=2000, outbox_frames=2000)
    session = await server.create_session()
    count, blob = 400, "x" * 30_000  # 12 MB: well past the kernel's socket buffers
    async with server.client("alice") as alice:
        await alice.request("join", session=session["id"])
        async with trio_websocket.open_websocket_url(server.ws_url, message_queue_size=1) as bob:
            await bob.send_message(orjson.dumps({"type": "hello", "token": server.token("bob")}).decode())
            assert orjson.loads(await bob.get_message())["type"] == "welcome"
            await bob.send_message(orjson.dumps({"type": "join", "session": session["id"], "ref": "j"}).decode())
            assert orjson.loads(await bob.get_message())["ref"] == "j"
            await alice.next_event("presence")
            for n in range(count):  # bob reads nothing meanwhile
                await alice.request("signal", session=session["id"], to="bob", kind="candidate",
                                    payload={"n": n, "blob": blob})
            seen = []
            while len(seen) < count:
                frame = orjson.loads(await bob.get_message())
                if frame["type"] == "signal":
                    assert frame["payload"]["blob"] == blob
                    seen.append(frame["payload"]["n"])
            assert seen == list(range(count))
