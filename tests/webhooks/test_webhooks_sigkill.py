"""The outbox survives SIGKILL: `python run.py serve` as a child process is killed right
after a session ended (before its webhook went out, or while the receiver holds it), and
after a restart on the same data directory `session.ended` arrives, with the same
`webhook-id` as any earlier attempt."""

from __future__ import annotations

import signal

import httpx
import pytest
import trio

from gateway.auth import mint_token

from ..processes import spawn_server
from .receiver import Received, Receiver

SECRET = "webhook-sigkill-secret-long-enough-for-hs256"


@pytest.mark.parametrize("kill_when", ["right_after_end", "during_delivery"])
async def test_session_ended_is_delivered_after_a_sigkill_and_restart(tmp_path, nursery, receiver: Receiver,
                                                                     kill_when: str):
    admin = {"Authorization": f"Bearer {mint_token(SECRET, 'admin', admin=True)}"}
    server_gone = trio.Event()

    async def respond(received: Received) -> int:
        if not server_gone.is_set():
            await server_gone.wait()  # hold every request until the first server is dead
            return 500
        return 200

    receiver.respond = respond
    args = ("--allow-private-webhooks",)
    first = await spawn_server(nursery, tmp_path, *args, secret=SECRET)
    async with httpx.AsyncClient(base_url=first.base_url, timeout=10, headers=admin) as http:
        endpoint = (await http.post("/api/webhooks", json={
            "url": receiver.url("/bill"), "events": ["session.ended"]})).json()
        receiver.secrets["/bill"] = endpoint["secret"]
        sid = (await http.post("/api/sessions", json={
            "payer": "alice", "provider": "bob", "rate_per_minute": 100, "currency": "EUR"})).json()["id"]
        assert (await http.post(f"/api/sessions/{sid}/start")).status_code == 200
        assert (await http.post(f"/api/sessions/{sid}/end")).status_code == 200
        if kill_when == "during_delivery":
            await receiver.wait_until(lambda: len(receiver.at("/bill")) == 1)
        first.process.send_signal(signal.SIGKILL)
        await first.process.wait()
    server_gone.set()
    before_restart = len(receiver.at("/bill"))
    assert before_restart == (1 if kill_when == "during_delivery" else before_restart)

    second = await spawn_server(nursery, tmp_path, *args, secret=SECRET)
    # a delivery whose sender died mid-POST is due again once its claim lapses (12 s)
    await receiver.wait_until(lambda: len(receiver.at("/bill")) > before_restart, timeout=25)
    got = receiver.at("/bill")
    assert all(r.verified for r in got), [r.error for r in got]
    assert {r.type for r in got} == {"session.ended"}
    assert len({r.id for r in got}) == 1  # one event, one webhook-id, however many attempts
    assert got[-1].event["data"]["session_id"] == sid and got[-1].event["data"]["currency"] == "EUR"
    async with httpx.AsyncClient(base_url=second.base_url, timeout=10, headers=admin) as http:
        with trio.fail_after(10):
            while (log := (await http.get(f"/api/webhooks/{endpoint['id']}/deliveries")).json())["items"][0][
                "status"
            ] != "delivered":
                await trio.sleep(0.05)
    assert log["items"][0]["event_id"] == got[-1].id
    second.process.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        assert await second.process.wait() == 0
