"""Session chat through a real server, real WebSockets and real HTTP (PRODUCT.md sections 5-7)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from parley_client import Client, RequestError

TEST_TIMEOUT = 15


async def _quiet(client: Client) -> None:
    """A round trip: every frame the server queued for `client` before it has arrived."""
    await client.request("ping")


async def _join_raw(client: Client, session_id: str) -> dict[str, Any]:
    """Join with an unregistered ref, so the `ok` lands in the event queue in arrival order."""
    await client.send_raw({"type": "join", "ref": "join-raw", "session": session_id})
    first = await client.next_event()
    assert first["type"] == "ok" and first["ref"] == "join-raw", first
    return first


async def _chat_messages(client: Client, count: int, *, timeout: float = 5) -> list[dict[str, Any]]:
    with trio.fail_after(timeout):
        return [await client.next_event("chat.message") for _ in range(count)]


async def _history(server, session_id: str, user: str = "alice", **query: Any) -> list[dict[str, Any]]:
    response = await server.http.get(f"/api/sessions/{session_id}/messages", params=query, headers=server.auth(user))
    assert response.status_code == 200, response.text
    return response.json()["items"]


# ---------------------------------------------------------------- send


async def test_send_acks_after_store_and_delivers_to_others_only(server):
    with trio.fail_after(TEST_TIMEOUT):
        session = await server.create_session(guests=["carol"])
        sid = session["id"]
        async with server.client("alice") as alice, server.client("bob") as bob, server.client("carol") as carol:
            for client in (alice, bob, carol):
                await client.request("join", session=sid)
            ack = await alice.request("chat.send", session=sid, client_id="c1", body="hello bob")
            assert ack["seq"] == 1
            assert ack["id"] and isinstance(ack["id"], str)
            assert ack["created_at"].endswith("Z") or "+" in ack["created_at"]
            for receiver in (bob, carol):
                got = await receiver.next_event("chat.message")
                assert got["session"] == sid
                assert (got["id"], got["seq"], got["sender"], got["body"], got["client_id"]) == (
                    ack["id"], 1, "alice", "hello bob", "c1",
                )
                assert got["deleted"] is False and got["edited_at"] is None
                assert got["created_at"] == ack["created_at"]
            # no echo to the sender
            await _quiet(alice)
            assert alice.pending_events("chat.message") == []
            ack2 = await bob.request("chat.send", session=sid, client_id="c1", body="hi alice")
            assert ack2["seq"] == 2 and ack2["id"] != ack["id"]  # client_id is per sender
            assert (await alice.next_event("chat.message"))["body"] == "hi alice"
            # stored: history says the same
            stored = await _history(server, sid)
            assert [(m["seq"], m["sender"], m["body"]) for m in stored] == [(1, "alice", "hello bob"), (2, "bob", "hi alice")]


async def test_resend_with_same_client_id_returns_original_and_delivers_nothing(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            first = await alice.request("chat.send", session=sid, client_id="same", body="once")
            again = await alice.request("chat.send", session=sid, client_id="same", body="once (retry)")
            assert (again["id"], again["seq"], again["created_at"]) == (first["id"], first["seq"], first["created_at"])
            assert (await bob.next_event("chat.message"))["id"] == first["id"]
            await _quiet(bob)
            assert bob.pending_events("chat.message") == []
            nxt = await alice.request("chat.send", session=sid, client_id="other", body="twice")
            assert nxt["seq"] == 2  # the retry used no seq
            assert [m["body"] for m in await _history(server, sid)] == ["once", "twice"]


async def test_send_requires_join_and_rejects_bad_bodies(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice:
            with pytest.raises(RequestError) as err:
                await alice.request("chat.send", session=sid, client_id="x", body="not joined")
            assert err.value.code == "not_joined"
            await alice.request("join", session=sid)
            for body, code in [("", "bad_request"), ("x" * 8001, "too_large"), (5, "bad_request"), (None, "bad_request")]:
                with pytest.raises(RequestError) as err:
                    await alice.request("chat.send", session=sid, client_id="x", body=body)
                assert err.value.code == code, body
            ok = await alice.request("chat.send", session=sid, client_id="x", body="é" * 8000)
            assert ok["seq"] == 1  # 8,000 characters (not bytes) is allowed; nothing before used a seq


# ---------------------------------------------------------------- edit / delete


async def test_edit_by_sender_reaches_everyone_and_others_are_forbidden(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            sent = await alice.request("chat.send", session=sid, client_id="e1", body="helo")
            ok = await alice.request("chat.edit", session=sid, id=sent["id"], body="hello")
            assert (ok["id"], ok["seq"], ok["body"]) == (sent["id"], 1, "hello")
            for client in (alice, bob):  # everyone joined, the editor included
                updated = await client.next_event("chat.updated")
                assert (updated["session"], updated["id"], updated["seq"], updated["body"]) == (sid, sent["id"], 1, "hello")
                assert updated["edited_at"] is not None and updated["deleted"] is False
            with pytest.raises(RequestError) as err:
                await bob.request("chat.edit", session=sid, id=sent["id"], body="hijacked")
            assert err.value.code == "forbidden"
            with pytest.raises(RequestError) as err:
                await alice.request("chat.edit", session=sid, id="no-such-message", body="x")
            assert err.value.code == "not_found"
            with pytest.raises(RequestError) as err:
                await alice.request("chat.edit", session=sid, id=sent["id"], body="")
            assert err.value.code == "bad_request"
            await _quiet(alice)
            assert alice.pending_events("chat.updated") == []  # the refused edits announced nothing
            assert [m["body"] for m in await _history(server, sid, "bob")] == ["hello"]


async def test_delete_by_sender_or_admin_keeps_id_and_seq(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice, server.client("bob") as bob, server.client("root") as root:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            one = await alice.request("chat.send", session=sid, client_id="d1", body="one")
            two = await alice.request("chat.send", session=sid, client_id="d2", body="two")
            with pytest.raises(RequestError) as err:
                await bob.request("chat.delete", session=sid, id=one["id"])
            assert err.value.code == "forbidden"
            ok = await alice.request("chat.delete", session=sid, id=one["id"])
            assert (ok["id"], ok["seq"], ok["body"], ok["deleted"]) == (one["id"], 1, None, True)
            for client in (alice, bob):
                deleted = await client.next_event("chat.deleted")
                assert (deleted["session"], deleted["id"], deleted["seq"], deleted["body"], deleted["deleted"]) == (
                    sid, one["id"], 1, None, True,
                )
            with pytest.raises(RequestError) as err:
                await alice.request("chat.edit", session=sid, id=one["id"], body="back")
            assert err.value.code == "conflict"
            # "root" is no participant and no admin: forbidden
            with pytest.raises(RequestError) as err:
                await root.request("chat.delete", session=sid, id=two["id"])
            assert err.value.code == "forbidden"
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            response = await server.http.delete(
                f"/api/sessions/{sid}/messages/{two['id']}", headers=server.auth("admin", admin=True)
            )
            assert response.status_code == 200, response.text
            assert (response.json()["seq"], response.json()["body"], response.json()["deleted"]) == (2, None, True)
            for client in (alice, bob):
                assert (await client.next_event("chat.deleted"))["id"] == two["id"]
        history = await _history(server, sid)
        assert [(m["seq"], m["id"], m["body"], m["deleted"]) for m in history] == [
            (1, one["id"], None, True), (2, two["id"], None, True),
        ]


# ---------------------------------------------------------------- receipts and typing


async def test_receipts_only_move_forward_and_others_see_them(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            for n in range(1, 4):
                await alice.request("chat.send", session=sid, client_id=f"m{n}", body=f"m{n}")
            ok = await bob.request("chat.receipt", session=sid, kind="delivered", seq=3)
            assert (ok["delivered_seq"], ok["read_seq"]) == (3, 0)
            assert await alice.next_event("receipt") == {"type": "receipt", "session": sid, "user": "bob", "kind": "delivered", "seq": 3}
            ok = await bob.request("chat.receipt", session=sid, kind="read", seq=2)
            assert (ok["delivered_seq"], ok["read_seq"]) == (3, 2)
            assert (await alice.next_event("receipt"))[("kind")] == "read"
            # backwards: the marks stay where they were
            ok = await bob.request("chat.receipt", session=sid, kind="delivered", seq=1)
            assert (ok["delivered_seq"], ok["read_seq"]) == (3, 2)
            ok = await bob.request("chat.receipt", session=sid, kind="read", seq=1)
            assert (ok["delivered_seq"], ok["read_seq"]) == (3, 2)
            # a receipt nobody can have earned
            with pytest.raises(RequestError) as err:
                await bob.request("chat.receipt", session=sid, kind="read", seq=99)
            assert err.value.code == "bad_request"
            await _quiet(alice)
            seen = [(e["kind"], e["seq"]) for e in alice.pending_events("receipt")]
            # whatever the server tells others about a backward receipt, it never shows a mark going down
            assert all(seq >= 2 for _, seq in seen), seen
            # reading implies delivery
            ok = await bob.request("chat.receipt", session=sid, kind="read", seq=3)
            assert (ok["delivered_seq"], ok["read_seq"]) == (3, 3)


async def test_read_receipt_raises_delivered_too(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            for n in range(1, 3):
                await alice.request("chat.send", session=sid, client_id=f"m{n}", body=f"m{n}")
            ok = await bob.request("chat.receipt", session=sid, kind="read", seq=2)
            assert (ok["delivered_seq"], ok["read_seq"]) == (2, 2)
        async with server.client("bob") as bob:
            await _join_raw(bob, sid)
            await _quiet(bob)
            assert bob.pending_events("chat.message") == []  # read means delivered: no backlog


async def test_typing_is_forwarded_and_expires(make_server):
    with trio.fail_after(TEST_TIMEOUT):
        server = await make_server(typing_timeout=0.5)
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            await alice.request("typing", session=sid, active=True)
            started = trio.current_time()
            assert await bob.next_event("typing") == {"type": "typing", "session": sid, "user": "alice", "active": True}
            stopped = await bob.next_event("typing", timeout=3)
            assert stopped == {"type": "typing", "session": sid, "user": "alice", "active": False}
            assert trio.current_time() - started >= 0.4  # not before the timeout
            await _quiet(alice)
            assert alice.pending_events("typing") == []  # no echo

            # explicit stop, and a message ends typing
            await alice.request("typing", session=sid, active=True)
            assert (await bob.next_event("typing"))["active"] is True
            await alice.request("typing", session=sid, active=False)
            assert (await bob.next_event("typing"))["active"] is False
            await alice.request("typing", session=sid, active=True)
            assert (await bob.next_event("typing"))["active"] is True
            await alice.request("chat.send", session=sid, client_id="t", body="done typing")
            assert (await bob.next_event("typing"))["active"] is False
            # stopping when not typing says nothing
            await alice.request("typing", session=sid, active=False)
            await _quiet(bob)
            assert bob.pending_events("typing") == []


async def test_typing_refreshes_keep_it_on_and_are_throttled(make_server):
    with trio.fail_after(TEST_TIMEOUT):
        server = await make_server(typing_timeout=0.5)
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            started = trio.current_time()
            for _ in range(10):  # refresh every 0.1 s for a second
                await alice.request("typing", session=sid, active=True)
                await trio.sleep(0.1)
            await _quiet(bob)
            seen = [e["active"] for e in bob.pending_events("typing")]
            assert False not in seen, "typing turned off while refreshed"
            assert 1 <= len(seen) <= 3, seen  # throttled: ~1 per second, not 10
            await bob.next_event("typing")  # drop the forwarded ones
            while bob.pending_events("typing"):
                await bob.next_event("typing")
            off = await bob.next_event("typing", timeout=3)
            assert off["active"] is False
            assert trio.current_time() - started >= 1.0 + 0.4


async def test_typing_requires_join(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice:
            with pytest.raises(RequestError) as err:
                await alice.request("typing", session=sid, active=True)
            assert err.value.code == "not_joined"


# ---------------------------------------------------------------- history


async def test_history_pages_oldest_first(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            ids = {}
            for n in range(1, 11):
                ids[n] = (await alice.request("chat.send", session=sid, client_id=f"h{n}", body=f"m{n}"))["id"]
            await alice.request("chat.delete", session=sid, id=ids[4])

            async def seqs(**query: Any) -> list[int]:
                page = await bob.request("chat.history", session=sid, **query)
                return [m["seq"] for m in page["messages"]]

            assert await seqs() == list(range(1, 11))
            assert await seqs(limit=3) == [1, 2, 3]
            assert await seqs(before_seq=8, limit=3) == [5, 6, 7]
            assert await seqs(after_seq=8, limit=3) == [9, 10]
            assert await seqs(after_seq=2, limit=3) == [3, 4, 5]
            assert await seqs(before_seq=1) == []
            assert await seqs(after_seq=10) == []
            page = await bob.request("chat.history", session=sid, after_seq=3, limit=1)
            (deleted,) = page["messages"]
            assert (deleted["seq"], deleted["id"], deleted["body"], deleted["deleted"]) == (4, ids[4], None, True)
            for bad in ({"limit": 0}, {"limit": 201}, {"before_seq": -1}, {"limit": "5"}):
                with pytest.raises(RequestError) as err:
                    await bob.request("chat.history", session=sid, **bad)
                assert err.value.code == "bad_request", bad
            # the same through REST
            assert [m["seq"] for m in await _history(server, sid, "bob", before_seq=8, limit=3)] == [5, 6, 7]
            assert [m["seq"] for m in await _history(server, sid, "bob", after_seq=8, limit=3)] == [9, 10]
            rest4 = (await _history(server, sid, "bob", after_seq=3, limit=1))[0]
            assert (rest4["body"], rest4["deleted"]) == (None, True)
            response = await server.http.get(
                f"/api/sessions/{sid}/messages", params={"limit": 201}, headers=server.auth("bob")
            )
            assert response.status_code == 422


# ---------------------------------------------------------------- offline queue


async def test_offline_queue_across_a_real_disconnect(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice:
            await alice.request("join", session=sid)
            async with server.client("bob") as bob:
                await bob.request("join", session=sid)
                assert (await alice.next_event("presence"))["state"] == "joined"
                await alice.request("chat.send", session=sid, client_id="1", body="m1")
                assert (await bob.next_event("chat.message"))["seq"] == 1
                await bob.request("chat.receipt", session=sid, kind="delivered", seq=1)
                await alice.request("chat.send", session=sid, client_id="2", body="m2")
                assert (await bob.next_event("chat.message"))["seq"] == 2  # seen, never acknowledged
            assert (await alice.next_event("presence"))["state"] == "left"
            for n in range(3, 6):  # bob is offline
                await alice.request("chat.send", session=sid, client_id=str(n), body=f"m{n}")

            async with server.client("bob") as bob:
                joined = await _join_raw(bob, sid)
                assert joined["last_seq"] == 5
                queued = await _chat_messages(bob, 4)
                assert [(m["seq"], m["body"]) for m in queued] == [(2, "m2"), (3, "m3"), (4, "m4"), (5, "m5")]
                assert all(m["session"] == sid for m in queued)
                # then live ones, no gap and no duplicate
                await alice.request("chat.send", session=sid, client_id="6", body="m6")
                assert (await bob.next_event("chat.message"))["seq"] == 6
                await _quiet(bob)
                assert bob.pending_events("chat.message") == []
                await bob.request("chat.receipt", session=sid, kind="delivered", seq=4)

            # acknowledged up to 4: 5 and 6 come again
            async with server.client("bob") as bob:
                await _join_raw(bob, sid)
                assert [m["seq"] for m in await _chat_messages(bob, 2)] == [5, 6]
                await bob.request("chat.receipt", session=sid, kind="delivered", seq=6)

            async with server.client("bob") as bob:
                await _join_raw(bob, sid)
                await alice.request("chat.send", session=sid, client_id="7", body="m7")
                assert (await bob.next_event("chat.message"))["seq"] == 7  # nothing older came first


async def test_offline_queue_survives_a_server_restart(make_server, tmp_path):
    with trio.fail_after(TEST_TIMEOUT):
        first = await make_server()
        sid = (await first.create_session())["id"]
        async with first.client("alice") as alice:
            await alice.request("join", session=sid)
            for n in range(1, 4):
                await alice.request("chat.send", session=sid, client_id=str(n), body=f"m{n}")
        await first.stop()
        await first.http.aclose()
        second = await make_server()
        async with second.client("bob") as bob:
            joined = await _join_raw(bob, sid)
            assert joined["last_seq"] == 3
            assert [m["body"] for m in await _chat_messages(bob, 3)] == ["m1", "m2", "m3"]
            ack = await bob.request("chat.send", session=sid, client_id="b", body="after restart")
            assert ack["seq"] == 4
        await second.http.aclose()


# ---------------------------------------------------------------- REST


async def test_rest_crud_status_codes(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session(guests=["carol"]))["id"]
        other = (await server.create_session(payer="dave", provider="erin"))["id"]
        base = f"/api/sessions/{sid}/messages"
        alice, bob, mallory = server.auth("alice"), server.auth("bob"), server.auth("mallory")

        created = await server.http.post(base, json={"client_id": "r1", "body": "hi"}, headers=alice)
        assert created.status_code == 201, created.text
        message = created.json()
        assert (message["seq"], message["sender"], message["body"], message["client_id"]) == (1, "alice", "hi", "r1")
        assert message["deleted"] is False and message["edited_at"] is None

        again = await server.http.post(base, json={"client_id": "r1", "body": "hi"}, headers=alice)
        assert again.status_code in (200, 201), again.text
        assert (again.json()["id"], again.json()["seq"]) == (message["id"], 1)

        got = await server.http.get(f"{base}/{message['id']}", headers=bob)
        assert got.status_code == 200 and got.json()["body"] == "hi"
        got = await server.http.get(f"{base}/{message['id']}", headers=server.auth("admin", admin=True))
        assert got.status_code == 200  # admins read

        # edit: only the sender
        assert (await server.http.patch(f"{base}/{message['id']}", json={"body": "no"}, headers=bob)).status_code == 403
        assert (await server.http.patch(
            f"{base}/{message['id']}", json={"body": "no"}, headers=server.auth("admin", admin=True)
        )).status_code == 403
        edited = await server.http.patch(f"{base}/{message['id']}", json={"body": "hi!"}, headers=alice)
        assert edited.status_code == 200, edited.text
        assert (edited.json()["body"], edited.json()["seq"]) == ("hi!", 1) and edited.json()["edited_at"]

        # unknown ids
        assert (await server.http.get(f"{base}/nope", headers=alice)).status_code == 404
        assert (await server.http.patch(f"{base}/nope", json={"body": "x"}, headers=alice)).status_code == 404
        assert (await server.http.delete(f"{base}/nope", headers=alice)).status_code == 404
        assert (await server.http.get("/api/sessions/nope/messages", headers=alice)).status_code == 404
        assert (await server.http.post(
            "/api/sessions/nope/messages", json={"client_id": "x", "body": "x"}, headers=alice
        )).status_code == 404
        # a message id of another session is unknown here
        theirs = await server.http.post(
            f"/api/sessions/{other}/messages", json={"client_id": "t", "body": "theirs"}, headers=server.auth("dave"),
        )
        assert theirs.status_code == 201
        assert (await server.http.get(f"{base}/{theirs.json()['id']}", headers=alice)).status_code == 404
        assert (await server.http.delete(f"{base}/{theirs.json()['id']}", headers=alice)).status_code == 404

        # bad bodies
        for body in ({"client_id": "b", "body": ""}, {"client_id": "b", "body": "x" * 8001},
                     {"client_id": "b", "body": 7}, {"client_id": "b", "body": None}, {"client_id": "b"},
                     {"client_id": "", "body": "x"}, {"body": "x"}, ["x"]):
            response = await server.http.post(base, json=body, headers=alice)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error"]["code"]
        for body in ({"body": ""}, {"body": "x" * 8001}, {"body": 7}, {}):
            response = await server.http.patch(f"{base}/{message['id']}", json=body, headers=alice)
            assert response.status_code == 422, (body, response.text)
        assert (await server.http.post(base, json={"client_id": "long", "body": "x" * 8000}, headers=alice)).status_code == 201

        # delete: sender or admin, not another participant
        assert (await server.http.delete(f"{base}/{message['id']}", headers=bob)).status_code == 403
        deleted = await server.http.delete(f"{base}/{message['id']}", headers=alice)
        assert deleted.status_code == 200
        assert (deleted.json()["id"], deleted.json()["seq"], deleted.json()["body"], deleted.json()["deleted"]) == (
            message["id"], 1, None, True,
        )
        assert (await server.http.get(f"{base}/{message['id']}", headers=bob)).json()["body"] is None

        # no token, a bad token
        assert (await server.http.get(base)).status_code == 401
        assert (await server.http.post(base, json={"client_id": "n", "body": "x"})).status_code == 401
        assert (await server.http.get(f"{base}/{message['id']}")).status_code == 401
        assert (await server.http.patch(f"{base}/{message['id']}", json={"body": "x"})).status_code == 401
        assert (await server.http.delete(f"{base}/{message['id']}")).status_code == 401
        assert (await server.http.get(base, headers={"Authorization": "Bearer junk"})).status_code == 401
        # guests are participants
        assert (await server.http.post(base, json={"client_id": "g", "body": "guest"}, headers=server.auth("carol"))).status_code == 201
        # nothing mallory tried left a trace
        assert (await server.http.get(base, headers=mallory)).status_code == 403
        bodies = [m["body"] for m in await _history(server, sid)]
        assert bodies == [None, "x" * 8000, "guest"]


async def test_rest_post_arrives_live_on_the_websocket(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            response = await server.http.post(
                f"/api/sessions/{sid}/messages", json={"client_id": "rest-1", "body": "from my back end"},
                headers=server.auth("alice"),
            )
            assert response.status_code == 201
            posted = response.json()
            for client in (alice, bob):  # the sender's own socket sees it too: it did not send it there
                got = await client.next_event("chat.message")
                assert (got["id"], got["seq"], got["body"], got["sender"], got["session"]) == (
                    posted["id"], 1, "from my back end", "alice", sid,
                )
            again = await server.http.post(
                f"/api/sessions/{sid}/messages", json={"client_id": "rest-1", "body": "from my back end"},
                headers=server.auth("alice"),
            )
            assert again.json()["id"] == posted["id"]
            # REST edits and deletes are live too
            await server.http.patch(f"/api/sessions/{sid}/messages/{posted['id']}", json={"body": "edited"}, headers=server.auth("alice"))
            assert (await bob.next_event("chat.updated"))["body"] == "edited"
            await server.http.delete(f"/api/sessions/{sid}/messages/{posted['id']}", headers=server.auth("alice"))
            assert (await bob.next_event("chat.deleted"))["id"] == posted["id"]
            await _quiet(bob)
            assert bob.pending_events("chat.message") == []  # the repeat delivered nothing


# ---------------------------------------------------------------- authorization


async def test_non_participant_can_neither_read_nor_write(server):
    with trio.fail_after(TEST_TIMEOUT):
        sid = (await server.create_session())["id"]
        base = f"/api/sessions/{sid}/messages"
        mallory = server.auth("mallory")
        async with server.client("alice") as alice, server.client("mallory") as spy, server.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            secret = await alice.request("chat.send", session=sid, client_id="s", body="secret")
            # frames
            attempts = [
                ("join", {}),
                ("chat.send", {"client_id": "m", "body": "let me in"}),
                ("chat.history", {}),
                ("chat.history", {"after_seq": 0}),
                ("chat.edit", {"id": secret["id"], "body": "pwned"}),
                ("chat.delete", {"id": secret["id"]}),
                ("chat.receipt", {"kind": "read", "seq": 1}),
                ("typing", {"active": True}),
            ]
            for type_, fields in attempts:
                with pytest.raises(RequestError) as err:
                    await spy.request(type_, session=sid, **fields)
                assert err.value.code in ("forbidden", "not_joined"), (type_, err.value.frame)
                assert "secret" not in str(err.value.frame)
            # REST
            assert (await server.http.get(base, headers=mallory)).status_code == 403
            assert (await server.http.get(f"{base}/{secret['id']}", headers=mallory)).status_code == 403
            assert (await server.http.post(base, json={"client_id": "m", "body": "x"}, headers=mallory)).status_code == 403
            assert (await server.http.patch(f"{base}/{secret['id']}", json={"body": "x"}, headers=mallory)).status_code == 403
            assert (await server.http.delete(f"{base}/{secret['id']}", headers=mallory)).status_code == 403
            # an admin reads but does not write
            admin = server.auth("admin", admin=True)
            assert (await server.http.get(base, headers=admin)).status_code == 200
            assert (await server.http.post(base, json={"client_id": "a", "body": "x"}, headers=admin)).status_code == 403
            # nothing leaked to mallory, nothing changed for the others
            await _quiet(spy)
            assert spy.pending_events() == []
            await _quiet(bob)
            assert [e["type"] for e in bob.pending_events()] == ["chat.message"]
            history = await _history(server, sid)
            assert [(m["body"], m["deleted"]) for m in history] == [("secret", False)]


async def test_participant_of_one_session_cannot_reach_another(server):
    with trio.fail_after(TEST_TIMEOUT):
        mine = (await server.create_session(payer="alice", provider="bob"))["id"]
        theirs = (await server.create_session(payer="dave", provider="erin"))["id"]
        async with server.client("dave") as dave, server.client("alice") as alice:
            await dave.request("join", session=theirs)
            private = await dave.request("chat.send", session=theirs, client_id="p", body="private")
            await alice.request("join", session=mine)
            # joined to her own session, alice still cannot touch theirs
            for type_, fields in [
                ("chat.send", {"client_id": "x", "body": "x"}),
                ("chat.history", {}),
                ("chat.edit", {"id": private["id"], "body": "x"}),
                ("chat.delete", {"id": private["id"]}),
                ("chat.receipt", {"kind": "read", "seq": 1}),
                ("typing", {"active": True}),
            ]:
                with pytest.raises(RequestError) as err:
                    await alice.request(type_, session=theirs, **fields)
                assert err.value.code in ("forbidden", "not_joined"), type_
            # a message id of their session, addressed through her own session
            for type_, fields in [("chat.edit", {"id": private["id"], "body": "x"}), ("chat.delete", {"id": private["id"]})]:
                with pytest.raises(RequestError) as err:
                    await alice.request(type_, session=mine, **fields)
                assert err.value.code == "not_found", type_
            await _quiet(dave)
            assert dave.pending_events() == []
        history = await _history(server, theirs, "dave")
        assert [(m["body"], m["deleted"]) for m in history] == [("private", False)]
