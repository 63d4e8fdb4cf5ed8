"""Webhooks through the real server and a real receiver that verifies every signature with
the `standardwebhooks` package: a full session's events in order with the final bill, the
admin REST API, SSRF refusals, 410, and a slow endpoint that delays no other."""

from __future__ import annotations

import trio
from standardwebhooks import Webhook

from .conftest import register
from .receiver import Received, Receiver


def admin(server):
    return server.auth("admin", admin=True)


async def test_a_full_session_yields_its_events_in_order_with_the_final_bill(make_server, receiver: Receiver):
    server = await make_server(billing_tick=0.2)
    endpoint = await register(server, receiver, "/hooks")
    session = await server.create_session(rate_per_minute=600)
    sid = session["id"]
    await server.start_session(sid)
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.request("join", session=sid)
        await bob.request("join", session=sid)
        while (await alice.next_event("billing"))["billable_ms"] < 300:
            pass
        ended = await server.http.post(f"/api/sessions/{sid}/end", headers=server.auth("alice"))
        assert ended.status_code == 200
    bill = (await server.http.get(f"/api/sessions/{sid}/billing", headers=admin(server))).json()
    assert bill["final"] is True and bill["billable_ms"] >= 300
    await receiver.wait_until(lambda: any(r.type == "session.ended" for r in receiver.received))
    await trio.sleep(0.5)  # nothing else comes
    got = receiver.at("/hooks")
    assert [r.type for r in got] == [
        "session.created", "session.started", "participant.joined", "participant.joined", "session.ended",
    ]
    assert all(r.verified for r in got), [r.error for r in got]
    assert len({r.id for r in got}) == len(got)
    assert [r.event["data"]["user"] for r in got if r.type == "participant.joined"] == ["alice", "bob"]
    assert all(r.event["data"]["session_id"] == sid for r in got)
    data = got[-1].event["data"]
    assert (data["billable_ms"], data["amount_minor"], data["currency"], data["end_reason"]) == (
        bill["billable_ms"], bill["amount_minor"], bill["currency"], "ended")
    assert data["session"]["state"] == "ended" and data["session"]["id"] == sid
    log = (await server.http.get(f"/api/webhooks/{endpoint['id']}/deliveries", headers=admin(server))).json()
    assert [d["event_type"] for d in log["items"]][::-1] == [r.type for r in got]
    assert all(d["status"] == "delivered" and d["attempts"] == 1 and d["last_status"] == 200 for d in log["items"])
    assert [d["event_id"] for d in log["items"]][::-1] == [r.id for r in got]


async def test_endpoints_rest_api_is_admin_only_and_shows_the_secret_once(server, receiver: Receiver):
    body = {"url": receiver.url("/a"), "events": ["session.created"], "description": "billing"}
    assert (await server.http.post("/api/webhooks", json=body)).status_code == 401
    assert (await server.http.post("/api/webhooks", json=body, headers=server.auth("alice"))).status_code == 403
    assert (await server.http.get("/api/webhooks", headers=server.auth("alice"))).status_code == 403
    bad = await server.http.post("/api/webhooks", json={**body, "events": ["nope"]}, headers=admin(server))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_request"
    assert (await server.http.post("/api/webhooks", json={**body, "events": []}, headers=admin(server))).status_code \
        == 422
    assert (await server.http.post("/api/webhooks", json={**body, "x": 1}, headers=admin(server))).status_code == 422
    created = await server.http.post("/api/webhooks", json=body, headers=admin(server))
    assert created.status_code == 201
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_") and endpoint["enabled"] is True
    assert endpoint["events"] == ["session.created"] and endpoint["description"] == "billing"
    listed = (await server.http.get("/api/webhooks", headers=admin(server))).json()
    assert [e["id"] for e in listed["items"]] == [endpoint["id"]] and listed["next_cursor"] is None
    assert "secret" not in listed["items"][0]
    one = await server.http.get(f"/api/webhooks/{endpoint['id']}", headers=admin(server))
    assert one.status_code == 200 and "secret" not in one.json()
    patched = await server.http.patch(
        f"/api/webhooks/{endpoint['id']}", json={"events": ["session.ended", "session.created"]}, headers=admin(server)
    )
    assert patched.status_code == 200 and patched.json()["events"] == ["session.ended", "session.created"]
    assert "secret" not in patched.json()
    assert (await server.http.get("/api/webhooks/wh_nope", headers=admin(server))).status_code == 404
    assert (await server.http.get("/api/webhooks/wh_nope/deliveries", headers=admin(server))).status_code == 404
    retry = await server.http.post(f"/api/webhooks/{endpoint['id']}/deliveries/12/retry", headers=admin(server))
    assert retry.status_code == 404
    openapi = (await server.http.get("/openapi.json")).json()
    for path in ("/api/webhooks", "/api/webhooks/{endpoint_id}", "/api/webhooks/{endpoint_id}/deliveries",
                 "/api/webhooks/{endpoint_id}/deliveries/{delivery_id}/retry"):
        assert path in openapi["paths"], path
    assert (await server.http.delete(f"/api/webhooks/{endpoint['id']}", headers=admin(server))).status_code == 204
    assert (await server.http.get(f"/api/webhooks/{endpoint['id']}", headers=admin(server))).status_code == 404


async def test_a_rotated_secret_signs_beside_the_new_one_and_retry_keeps_the_webhook_id(server, receiver: Receiver):
    endpoint = await register(server, receiver, "/r", events=["session.created"])
    old = endpoint["secret"]
    rotated = await server.http.patch(
        f"/api/webhooks/{endpoint['id']}", json={"rotate_secret": True}, headers=admin(server)
    )
    assert rotated.status_code == 200
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["previous_secret_until"] is not None
    receiver.secrets["/r"] = new
    await server.create_session()
    await receiver.wait_until(lambda: len(receiver.at("/r")) == 1)
    first = receiver.at("/r")[0]
    assert first.verified and len(first.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(first.body, first.headers)  # the old secret still verifies, for 24 h
    log = (await server.http.get(f"/api/webhooks/{endpoint['id']}/deliveries", headers=admin(server))).json()
    [delivery] = log["items"]
    again = await server.http.post(
        f"/api/webhooks/{endpoint['id']}/deliveries/{delivery['id']}/retry", headers=admin(server)
    )
    assert again.status_code == 200 and again.json()["status"] == "pending"
    await receiver.wait_until(lambda: len(receiver.at("/r")) == 2)
    assert receiver.at("/r")[1].id == first.id and receiver.at("/r")[1].verified


async def test_private_addresses_are_refused_outside_development_mode(make_server, receiver: Receiver):
    server = await make_server(dev=False)
    for url in ("http://127.0.0.1:9/x", "http://localhost/x", "http://10.1.2.3/x", "http://192.168.0.1/",
                "http://169.254.169.254/latest/meta-data", "http://[::1]/x", "http://[fd00:ec2::254]/",
                "http://[::ffff:127.0.0.1]/", "http://100.64.0.1/", "http://0.0.0.0/", "ftp://example.com/",
                "not a url"):
        refused = await server.http.post(
            "/api/webhooks", json={"url": url, "events": ["session.created"]}, headers=admin(server)
        )
        assert refused.status_code == 422, (url, refused.text)
    # a public address is accepted (no event is created here, so nothing is ever sent to it)
    public = await server.http.post(
        "/api/webhooks", json={"url": "https://93.184.216.34/hook", "events": ["session.created"]},
        headers=admin(server),
    )
    assert public.status_code == 201
    moved = await server.http.patch(
        f"/api/webhooks/{public.json()['id']}", json={"url": "http://127.0.0.1/x"}, headers=admin(server)
    )
    assert moved.status_code == 422
    await server.http.delete(f"/api/webhooks/{public.json()['id']}", headers=admin(server))
    await server.stop()


async def test_the_flag_allows_private_addresses(make_server, receiver: Receiver):
    server = await make_server(dev=False, allow_private_webhooks=True)
    await register(server, receiver, "/ok", events=["session.created"])
    await server.create_session()
    await receiver.wait_until(lambda: len(receiver.at("/ok")) == 1)
    assert receiver.at("/ok")[0].verified


async def test_410_disables_the_endpoint(server, receiver: Receiver):
    async def gone(received: Received) -> int:
        return 410 if received.path == "/gone" else 200

    receiver.respond = gone
    endpoint = await register(server, receiver, "/gone", events=["session.created"])
    await server.create_session()
    await receiver.wait_until(lambda: len(receiver.at("/gone")) == 1)
    with trio.fail_after(5):
        while (state := (await server.http.get(f"/api/webhooks/{endpoint['id']}", headers=admin(server))).json())[
            "enabled"
        ]:
            await trio.sleep(0.02)
    assert "410" in state["disabled_reason"]
    await server.create_session()  # a disabled endpoint is not sent anything
    await trio.sleep(0.3)
    assert len(receiver.at("/gone")) == 1
    log = (await server.http.get(f"/api/webhooks/{endpoint['id']}/deliveries", headers=admin(server))).json()
    assert [(d["status"], d["last_status"]) for d in log["items"]] == [("failed", 410)]


async def test_a_slow_endpoint_does_not_delay_another(server, receiver: Receiver):
    async def respond(received: Received) -> int:
        if received.path == "/slow":
            await trio.sleep(30)
        return 200

    receiver.respond = respond
    await register(server, receiver, "/slow", events=["session.created"])
    await register(server, receiver, "/fast", events=["session.created"])
    start = trio.current_time()
    for _ in range(6):
        await server.create_session()
    await receiver.wait_until(lambda: len(receiver.at("/fast")) == 6, timeout=5)
    assert max(r.at for r in receiver.at("/fast")) - start < 3
    assert all(r.verified for r in receiver.received)
    # the slow one got its first few (bounded per endpoint) and is still sleeping on them
    assert 1 <= len(receiver.at("/slow")) <= 6
