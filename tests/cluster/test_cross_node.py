"""Three nodes in one Trio run over a real Redis and a real PostgreSQL: the payer on node 1,
the provider on node 2, the session owned by node 3. Everything works as on one node."""

from __future__ import annotations

import coredis
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from actors.ports import ConnectionRef, ToConnection
from actors.session import JoinSession
from parley_client import RequestError

TEST_TIMEOUT = 30


async def test_a_call_across_three_nodes(make_node):
    with trio.fail_after(TEST_TIMEOUT):
        n1, n2, n3 = [await make_node(f"n{i}", billing_tick=0.5) for i in (1, 2, 3)]
        session = await n3.create_session()
        sid = session["id"]
        await n3.start_session(sid)  # the first lookup: node 3 claims it
        admin = await n3.http.get(f"/api/sessions/{sid}", headers=n3.auth("admin", admin=True))
        assert admin.json()["owner_node"] == "n3"
        async with n1.client("alice") as alice, n2.client("bob") as bob:
            joined = await alice.request("join", session=sid)
            assert joined["participants"] == ["alice"]
            started = trio.current_time()  # billing starts after this, when the owner takes bob's join
            await bob.request("join", session=sid)
            assert (await alice.next_event("presence"))["user"] == "bob"
            # signaling, both ways
            await alice.request("signal", session=sid, to="bob", kind="offer", payload={"sdp": "v=0"})
            signal = await bob.next_event("signal")
            assert (signal["from"], signal["kind"], signal["payload"]) == ("alice", "offer", {"sdp": "v=0"})
            await bob.request("signal", session=sid, to="alice", kind="answer", payload={"sdp": "v=1"})
            assert (await alice.next_event("signal"))["kind"] == "answer"
            # typing
            await alice.request("typing", session=sid, active=True)
            assert (await bob.next_event("typing"))["active"] is True
            # chat with acks, then receipts
            acks = [await alice.request("chat.send", session=sid, client_id=f"c{i}", body=f"m{i}") for i in range(5)]
            assert [a["seq"] for a in acks] == [1, 2, 3, 4, 5]
            got = [await bob.next_event("chat.message") for _ in range(5)]
            assert [g["seq"] for g in got] == [1, 2, 3, 4, 5]
            await bob.request("chat.receipt", session=sid, kind="delivered", seq=5)
            assert (await alice.next_event("receipt"))["seq"] == 5
            # REST on a fourth path: a message posted through node 2's REST reaches both sockets
            posted = await n2.http.post(f"/api/sessions/{sid}/messages", json={"client_id": "r1", "body": "rest"},
                                        headers=n2.auth("bob"))
            assert posted.status_code == 201 and posted.json()["seq"] == 6
            assert (await alice.next_event("chat.message"))["seq"] == 6
            # billing events come from the owner to both nodes
            billing = await alice.next_event("billing", timeout=5)
            assert billing["billable_ms"] >= 0
            live = await n1.http.get(f"/api/sessions/{sid}/billing", headers=n1.auth("alice"))
            assert live.status_code == 200 and live.json()["final"] is False
            # not joined on another node: refused there as on one node
            async with n1.client("mallory") as mallory:
                try:
                    await mallory.request("join", session=sid)
                    raise AssertionError("a stranger joined")
                except RequestError as exc:
                    assert exc.code == "forbidden"
            await trio.sleep(1.0)
            # bob leaves, alice sends, bob comes back on another node: the offline queue
            await bob.request("leave", session=sid)
            both_present = trio.current_time() - started
            for i in range(3):
                await alice.request("chat.send", session=sid, client_id=f"late{i}", body=f"late {i}")
        async with n3.client("bob") as bob:
            await bob.request("join", session=sid)
            backlog = [await bob.next_event("chat.message") for _ in range(4)]
            assert [m["seq"] for m in backlog] == [6, 7, 8, 9]
        ended = await n1.http.post(f"/api/sessions/{sid}/end", headers=n1.auth("alice"))
        assert ended.status_code == 200 and ended.json()["state"] == "ended"
        again = await n2.http.post(f"/api/sessions/{sid}/end", headers=n2.auth("alice"))
        assert again.status_code == 409 and again.json()["error"]["state"] == "ended"
        bill = (await n2.http.get(f"/api/sessions/{sid}/billing", headers=n2.auth("alice"))).json()
        assert bill["final"] is True
        assert 0 < bill["billable_ms"] <= both_present * 1000 + 50


async def test_a_remote_member_whose_reports_stop_is_dropped_at_its_last_report(make_node):
    """A member on another node whose leave was lost (Redis restarted) is no ghost: once
    silent for three heartbeats it leaves at its last reported instant, billed no further."""
    with trio.fail_after(TEST_TIMEOUT):
        n1 = await make_node("n1", heartbeat=0.3)
        await make_node("n2", heartbeat=0.3)
        session = await n1.create_session()
        sid = session["id"]
        await n1.start_session(sid)
        directory = n1.running.context.directory
        async with n1.client("alice") as alice:
            await alice.request("join", session=sid)
            ghost = ConnectionRef(id="ghost", user="bob", node="n2")  # nothing on n2 reports for it
            await directory.route(sid, JoinSession(conn=ghost, reply=ToConnection(conn=ghost, ref=None)))
            assert (await alice.next_event("presence"))["state"] == "joined"
            left = await alice.next_event("presence", timeout=5)
            assert (left["user"], left["state"]) == ("bob", "left")
        ended = await n1.http.post(f"/api/sessions/{sid}/end", headers=n1.auth("alice"))
        assert ended.status_code == 200
        bill = (await n1.http.get(f"/api/sessions/{sid}/billing", headers=n1.auth("alice"))).json()
        assert bill["billable_ms"] <= 20  # billed up to its last report (the join), not the silence after
        timeline = (await n1.http.get(f"/api/sessions/{sid}/timeline", headers=n1.auth("alice"))).json()["items"]
        assert any(e["kind"] == "dropped" and e["actor"] == "bob" for e in timeline)


async def test_a_graceful_shutdown_hands_sessions_over(make_node):
    """SIGTERM of the owner: it checkpoints, gives its sessions and its lease up, and the
    connections on the other node are joined again at the new owner without a reconnect."""
    with trio.fail_after(TEST_TIMEOUT):
        n1 = await make_node("n1", billing_tick=0.5)
        n2 = await make_node("n2", billing_tick=0.5)
        session = await n1.create_session()
        sid = session["id"]
        await n1.start_session(sid)
        async with n2.client("alice") as alice, n2.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            await alice.request("chat.send", session=sid, client_id="c1", body="before")
            await n1.stop()
            with trio.fail_after(5):
                while (await n2.http.get(f"/api/sessions/{sid}", headers=n2.auth("admin", admin=True))).json()[
                        "owner_node"] != "n2":
                    await trio.sleep(0.05)
            with trio.fail_after(5):  # both joined again by their node: billing goes on
                seen = []
                while len(seen) < 2 or seen[-1] <= seen[-2]:
                    live = (await n2.http.get(f"/api/sessions/{sid}/billing", headers=n2.auth("alice"))).json()
                    seen.append(live["billable_ms"])
                    await trio.sleep(0.2)
            ack = await alice.request("chat.send", session=sid, client_id="c2", body="after")
            assert ack["seq"] == 2
            assert [(await bob.next_event("chat.message"))["seq"] for _ in range(2)] == [1, 2]


async def test_connections_per_user_are_limited_cluster_wide(make_node, redis_server):
    with trio.fail_after(TEST_TIMEOUT):
        n1 = await make_node("n1", max_connections_per_user=2)
        n2 = await make_node("n2", max_connections_per_user=2)
        async with n1.client("alice") as one, n2.client("alice") as two:
            for node in (n1, n2):  # a third, on either node, is one too many
                async with open_websocket_url(node.ws_url) as ws:
                    await ws.send_message(orjson.dumps({"type": "hello", "token": node.token("alice")}).decode())
                    with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                        while True:
                            await ws.get_message()
                assert closed.value.reason.code == 4008
            await one.request("ping")
            await two.request("ping")
        # closed connections count no more; a dead node's connections neither
        async with coredis.Redis.from_url(redis_server.url) as redis:
            await redis.hset("parley:conns:alice", {"a-dead-node": 5})
        async with n1.client("alice") as again, n2.client("alice") as also:
            await again.request("ping")
            await also.request("ping")
