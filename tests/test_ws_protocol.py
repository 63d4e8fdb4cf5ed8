"""Frame rules of PRODUCT.md section 6 over a real socket: bad frames answered without
closing, size limits, query-token auth, ping, connection limit, shutdown close code."""

from __future__ import annotations

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from parley_client import connect


async def error_for(client, frame: dict | str) -> dict:
    await client.send_raw(frame)
    return await client.next_event("error", timeout=5)


async def still_open(client) -> None:
    reply = await client.request("ping", timeout=5)
    assert reply["type"] == "ok"


@pytest.mark.parametrize("frame, ref", [
    ("{not json", None),
    ("[1, 2, 3]", None),
    ('"just a string"', None),
    ({"type": "no.such.type", "ref": "u1"}, "u1"),
    ({"ref": "u2"}, "u2"),
    ({"type": "join", "ref": "w1", "session": 5}, "w1"),
    ({"type": "join", "ref": "w2"}, "w2"),
    ({"type": "signal", "ref": "w3", "session": "s", "to": "bob", "kind": "sdp", "payload": {}}, "w3"),
    ({"type": "typing", "ref": "w4", "session": "s", "active": "yes"}, "w4"),
    ({"type": "chat.send", "ref": "w5", "session": "s", "client_id": "c", "body": ""}, "w5"),
    ({"type": "ping", "ref": 7}, None),
])
async def test_bad_frames_get_bad_request_and_the_connection_stays_open(server, frame, ref):
    async with server.client("alice") as alice:
        error = await error_for(alice, frame if isinstance(frame, str) else orjson.dumps(frame).decode())
        assert error["code"] == "bad_request", error
        assert error.get("ref") == ref
        assert error["message"]
        await still_open(alice)


async def test_size_limits_answer_too_large(server):
    async with server.client("alice") as alice:
        body = {"type": "chat.send", "ref": "big", "session": "s", "client_id": "c", "body": "x" * 8001}
        error = await error_for(alice, body)
        assert (error["code"], error["ref"]) == ("too_large", "big")
        payload = {"type": "signal", "ref": "pay", "session": "s", "to": "bob", "kind": "offer",
                   "payload": {"sdp": "x" * (32 * 1024 + 1)}}
        error = await error_for(alice, payload)
        assert (error["code"], error["ref"]) == ("too_large", "pay")
        error = await error_for(alice, {"type": "join", "ref": "long", "session": "s" * 500})
        assert (error["code"], error["ref"]) == ("too_large", "long")
        await still_open(alice)


async def test_limits_at_the_edge_are_served(server):
    session = await server.create_session()
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.request("join", session=session["id"])
        await bob.request("join", session=session["id"])
        payload = {"sdp": "x" * (32 * 1024 - 20)}
        assert len(orjson.dumps(payload)) <= 32 * 1024
        await alice.request("signal", session=session["id"], to="bob", kind="offer", payload=payload)
        assert (await bob.next_event("signal"))["payload"] == payload


async def test_a_frame_over_64_kib_closes_1009(server):
    async with server.client("alice") as alice:
        await alice.send_raw({"type": "ping", "pad": "x" * (64 * 1024 + 1)})
        closed = await alice.wait_closed(timeout=5)
        assert closed.code == 1009


async def test_token_in_query_authenticates(server):
    async with connect(server.ws_url, server.token("alice"), token_in_query=True) as alice:
        assert alice.welcome["user"] == "alice"
        assert alice.welcome["heartbeat"] == server.settings.heartbeat
        await still_open(alice)


async def test_bad_query_token_closes_4001(server):
    async with open_websocket_url(f"{server.ws_url}?token=not-a-token") as ws:
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason.code == 4001


async def test_ping_with_and_without_ref(server):
    async with server.client("alice") as alice:
        reply = await alice.request("ping")
        assert reply["type"] == "ok" and reply["ref"].startswith("r")
        await alice.send_raw({"type": "ping"})
        assert await alice.next_event(timeout=5) == {"type": "pong"}


async def test_connections_per_user_limit_closes_4008(make_server):
    server = await make_server(max_connections_per_user=2)
    async with server.client("alice") as one, server.client("alice") as two:
        async with open_websocket_url(server.ws_url) as ws:
            await ws.send_message(orjson.dumps({"type": "hello", "token": server.token("alice")}).decode())
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == 4008
        await still_open(one)
        await still_open(two)
        async with server.client("bob") as bob:  # the limit is per user
            await still_open(bob)
    # the count went down when they closed
    with trio.fail_after(5):
        while server.running.post_office.statistics().connections:
            await trio.sleep(0.01)
    async with server.client("alice") as again:
        await still_open(again)


async def test_graceful_shutdown_closes_clients_1001(server):
    session = await server.create_session()
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.request("join", session=session["id"])
        with trio.fail_after(15):
            await server.stop()
        for client in (alice, bob):
            closed = await client.wait_closed(timeout=5)
            assert closed.code == 1001
