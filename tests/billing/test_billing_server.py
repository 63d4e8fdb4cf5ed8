"""Billing through the real server: REST figures, a silent drop, a SIGKILL and restart."""

from __future__ import annotations

import signal

import httpx
import pytest
import trio
import trio_websocket

from gateway.auth import mint_token
from parley_client import connect

from ..processes import spawn_server


async def test_billing_route_live_then_final_and_who_may_read_it(make_server):
    server = await make_server(billing_tick=0.2)
    session = await server.create_session(rate_per_minute=600)  # 10 minor units per second
    sid = session["id"]
    forbidden = await server.http.get(f"/api/sessions/{sid}/billing", headers=server.auth("mallory"))
    assert forbidden.status_code == 403
    assert (await server.http.get(f"/api/sessions/{sid}/billing")).status_code == 401
    await server.start_session(sid)
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.request("join", session=sid)
        await bob.request("join", session=sid)
        first = await alice.next_event("billing")
        assert first["billable_ms"] == 0 and first["final"] is False
        later = await alice.next_event("billing")
        assert later["billable_ms"] > 0 and later["currency"] == "USD"
        live = (await server.http.get(f"/api/sessions/{sid}/billing", headers=server.auth("bob"))).json()
        assert live["final"] is False and live["rate_per_minute"] == 600
        assert live["billable_ms"] >= later["billable_ms"]
        ended = await server.http.post(f"/api/sessions/{sid}/end", headers=server.auth("alice"))
        assert ended.status_code == 200 and ended.json()["state"] == "ended"
        while not (final_event := await bob.next_event("billing"))["final"]:
            pass
    bill = (await server.http.get(f"/api/sessions/{sid}/billing", headers=server.auth("admin", admin=True))).json()
    assert bill["final"] is True
    assert bill["amount_minor"] == -(-bill["billable_ms"] * 600 // 60000)
    assert sum(s["ms"] for s in bill["segments"]) == bill["billable_ms"]
    again = await server.http.post(f"/api/sessions/{sid}/end", headers=server.auth("alice"))
    assert again.status_code == 409 and again.json()["error"]["state"] == "ended"
    assert (await server.http.get(f"/api/sessions/{sid}/billing", headers=server.auth("alice"))).json() == bill
    timeline = (await server.http.get(f"/api/sessions/{sid}/timeline", headers=server.auth("alice"))).json()
    kinds = [e["kind"] for e in timeline["items"]]
    assert kinds[0] == "created" and "started" in kinds and kinds[-1] == "billing_finalized"
    assert kinds.count("joined") == 2 and "billing_started" in kinds
    assert (final_event["billable_ms"], final_event["amount_minor"]) == (bill["billable_ms"], bill["amount_minor"])


async def test_a_silent_drop_is_not_billed_past_its_last_pong(make_server, monkeypatch):
    """Bob's client stops answering pings: he is billed until his last sign of life, not
    until the heartbeat gives up on him two intervals later."""
    frozen: set[object] = set()
    original = trio_websocket.WebSocketConnection._handle_ping_event

    async def maybe_ignore(self, event):
        if self not in frozen:
            await original(self, event)

    monkeypatch.setattr(trio_websocket.WebSocketConnection, "_handle_ping_event", maybe_ignore)
    heartbeat = 1.0
    server = await make_server(billing_tick=0.25, heartbeat=heartbeat)
    session = await server.create_session(rate_per_minute=60_000)  # 1 per ms: amount == ms
    sid = session["id"]
    await server.start_session(sid)
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.request("join", session=sid)
        await bob.request("join", session=sid)
        both_since = trio.current_time()
        assert (await alice.next_event("presence"))["state"] == "joined"
        await trio.sleep(1.0)
        await bob.request("ping")
        frozen.add(bob.ws)
        frozen_at = trio.current_time()
        left = await alice.next_event("presence", timeout=4 * heartbeat + 2)
        noticed_at = trio.current_time()
        assert (left["user"], left["state"]) == ("bob", "left")
        assert noticed_at - frozen_at >= heartbeat  # the ghost window was real
    bill = (await server.http.get(f"/api/sessions/{sid}/billing", headers=server.auth("alice"))).json()
    alive_ms = (frozen_at - both_since) * 1000
    ghost_ms = (noticed_at - frozen_at) * 1000
    # billed until the last pong, which came at most one heartbeat after the freeze
    assert bill["billable_ms"] <= alive_ms + heartbeat * 1000 + 250
    assert bill["billable_ms"] < alive_ms + ghost_ms - 250
    assert bill["billable_ms"] >= alive_ms - 250
    timeline = (await server.http.get(f"/api/sessions/{sid}/timeline", headers=server.auth("alice"))).json()
    drops = [e for e in timeline["items"] if e["kind"] == "dropped"]
    assert len(drops) == 1 and drops[0]["actor"] == "bob" and drops[0]["detail"]["last_alive"]


async def test_sigkill_mid_call_never_overbills_and_loses_at_most_a_tick_and_a_heartbeat(tmp_path, nursery):
    secret = "sigkill-test-secret-long-enough-for-hs256!"
    admin = {"Authorization": f"Bearer {mint_token(secret, 'admin', admin=True)}"}
    args = ("--billing-tick", "0.25", "--heartbeat", "0.5")
    first = await spawn_server(nursery, tmp_path, *args, secret=secret)
    async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as http:
        created = await http.post("/api/sessions", headers=admin, json={
            "payer": "alice", "provider": "bob", "rate_per_minute": 60_000, "currency": "USD"})
        sid = created.json()["id"]
        assert (await http.post(f"/api/sessions/{sid}/start", headers=admin)).status_code == 200
    async with connect(first.ws_url, mint_token(secret, "alice")) as alice, \
            connect(first.ws_url, mint_token(secret, "bob")) as bob:
        await alice.request("join", session=sid)
        await bob.request("join", session=sid)
        both_since = trio.current_time()
        await trio.sleep(1.6)
        first.process.send_signal(signal.SIGKILL)
        killed_at = trio.current_time()
        await first.process.wait()
        await alice.wait_closed()
    really_both_ms = (killed_at - both_since) * 1000
    second = await spawn_server(nursery, tmp_path, *args, secret=secret)
    async with httpx.AsyncClient(base_url=second.base_url, timeout=10) as http:
        bill = (await http.get(f"/api/sessions/{sid}/billing", headers=admin)).json()
        assert bill["billable_ms"] <= really_both_ms  # never over-counted
        # one tick, plus the time since the last pong each had answered (+ scheduling slack)
        assert bill["billable_ms"] >= really_both_ms - 250 - 500 - 150
        ended = await http.post(f"/api/sessions/{sid}/end", headers=admin)
        assert ended.status_code == 200
        final = (await http.get(f"/api/sessions/{sid}/billing", headers=admin)).json()
        assert final["final"] is True and final["billable_ms"] == bill["billable_ms"]
        timeline = (await http.get(f"/api/sessions/{sid}/timeline", headers=admin)).json()
        assert "billing_gap" in [e["kind"] for e in timeline["items"]]
    second.process.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        assert await second.process.wait() == 0


@pytest.mark.parametrize("user, status", [("alice", 403), ("admin", 201)])
async def test_only_admins_create_sessions(server, user, status):
    response = await server.http.post("/api/sessions", headers=server.auth(user, admin=user == "admin"), json={
        "payer": "alice", "provider": "bob", "rate_per_minute": 100, "currency": "USD"})
    assert response.status_code == status
