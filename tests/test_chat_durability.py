"""Chat durability: SIGKILL the real server process while clients send as fast as acks return.

PRODUCT.md section 5: "A message is acknowledged only after it is durably stored"; section 9:
"A SIGKILL loses nothing that was acknowledged." After a restart on the same data directory,
every acknowledged message is in history with its id, seq and body, seqs are gapless, and
the session goes on numbering where it stopped.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed

from gateway.auth import mint_token
from parley_client import Closed, RequestError, connect

from .conftest import SECRET
from .processes import ServerProcess, spawn_server


async def _start(nursery: trio.Nursery, data_dir: Path) -> ServerProcess:
    return await spawn_server(nursery, data_dir, secret=SECRET)


def _auth(user: str, *, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user, admin=admin, ttl=600)}"}


async def _history(http: httpx.AsyncClient, sid: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while True:
        response = await http.get(
            f"/api/sessions/{sid}/messages", params={"after_seq": len(items), "limit": 200}, headers=_auth("alice"),
        )
        assert response.status_code == 200, response.text
        page = response.json()["items"]
        if not page:
            return items
        items.extend(page)


async def test_sigkill_mid_stream_loses_no_acknowledged_message(tmp_path):
    data_dir = tmp_path / "data"
    rng = random.Random(20)
    acked: dict[str, dict[str, Any]] = {}  # client_id → ack
    attempted: dict[str, str] = {}  # client_id → body
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            first = await _start(nursery, data_dir)
            async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as http:
                created = await http.post(
                    "/api/sessions", headers=_auth("admin", admin=True),
                    json={"payer": "alice", "provider": "bob", "rate_per_minute": 60, "currency": "EUR"},
                )
                assert created.status_code == 201, created.text
                sid = created.json()["id"]

            async def send_until_killed(user: str, enough: trio.Event) -> None:
                try:
                    async with connect(first.ws_url, mint_token(SECRET, user, ttl=600)) as client:
                        await client.request("join", session=sid)
                        for n in range(100_000):
                            client_id = f"{user}-{n}"
                            attempted[client_id] = body = f"{user} says {n}"
                            ack = await client.request("chat.send", session=sid, client_id=client_id, body=body)
                            acked[client_id] = ack
                            if len(acked) >= 300:
                                enough.set()
                except* (RequestError, Closed, ConnectionClosed, trio.BrokenResourceError, OSError):
                    pass  # the server is gone

            async with trio.open_nursery() as senders:
                enough = trio.Event()
                senders.start_soon(send_until_killed, "alice", enough)
                senders.start_soon(send_until_killed, "bob", enough)
                await enough.wait()
                await trio.sleep(rng.random() * 0.05)  # somewhere mid-stream, mid-batch
                first.process.send_signal(signal.SIGKILL)
                await first.process.wait()
            assert first.process.returncode == -signal.SIGKILL
            assert len(acked) >= 300

            second = await _start(nursery, data_dir)
            try:
                async with httpx.AsyncClient(base_url=second.base_url, timeout=10) as http:
                    history = await _history(http, sid)
                    by_client_id = {m["client_id"]: m for m in history}
                    missing = [cid for cid in acked if cid not in by_client_id]
                    assert missing == [], f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
                    for cid, ack in acked.items():
                        stored = by_client_id[cid]
                        assert (stored["id"], stored["seq"], stored["created_at"], stored["body"]) == (
                            ack["id"], ack["seq"], ack["created_at"], attempted[cid],
                        )
                    assert [m["seq"] for m in history] == list(range(1, len(history) + 1))
                    assert len(history) - len(acked) <= 2  # at most each sender's one unanswered send
                    assert all(m["client_id"] in attempted for m in history)

                    # the session numbers on where it stopped; a retry of an unanswered send is no duplicate
                    async with connect(second.ws_url, mint_token(SECRET, "alice", ttl=600)) as alice:
                        joined = await alice.request("join", session=sid)
                        assert joined["last_seq"] == len(history)
                        unanswered = [cid for cid in attempted if cid.startswith("alice-") and cid not in acked]
                        for cid in unanswered:
                            retry = await alice.request("chat.send", session=sid, client_id=cid, body=attempted[cid])
                            if cid in by_client_id:
                                assert (retry["id"], retry["seq"]) == (by_client_id[cid]["id"], by_client_id[cid]["seq"])
                        after = await alice.request("chat.send", session=sid, client_id="after-restart", body="still here")
                        expected = len(history) + sum(1 for cid in unanswered if cid not in by_client_id) + 1
                        assert after["seq"] == expected
                    final = await _history(http, sid)
                    assert [m["seq"] for m in final] == list(range(1, len(final) + 1))
            finally:
                second.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await second.process.wait()
                if second.process.returncode is None:
                    second.process.kill()
            assert second.process.returncode == 0  # SIGTERM is a clean shutdown
            nursery.cancel_scope.cancel()
