"""Two aiortc peers connect through Parley's signaling only, and a stranger cannot signal them.

Each peer is its own `parley_client` connection (Trio) plus its own aiortc stack
(asyncio, in its own thread). The only thing the two share is the server: SDP goes
out as `signal` frames through the peer's own client, and comes in through that
client's `next_event("signal")`, handed to the peer's thread through the peer's own
queue. aiortc gathers its candidates before the description is set (no trickle), so
they travel inside the offer and answer.
"""

from __future__ import annotations

import asyncio
import functools
import queue
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from parley_client import Client, RequestError

aiortc = pytest.importorskip("aiortc")
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

PEER_TIMEOUT = 30.0  # seconds for one peer's whole dialog
ROUNDS = 5  # messages each way


@pytest.fixture(autouse=True)
def loopback_candidates(monkeypatch):
    """aioice leaves 127.0.0.1 out of its host candidates; keep the test on loopback, like CI's sandbox."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@dataclass
class Peer:
    """One side: its own Parley connection, and an aiortc peer run by `dialog` in its own thread."""

    name: str
    other: str
    session: str
    client: Client
    trio_token: trio.lowlevel.TrioToken
    inbox: queue.Queue = field(default_factory=queue.Queue)  # signal frames for this peer only
    received: list[str] = field(default_factory=list)
    state: str = "new"

    # --- the Trio side

    async def pump(self) -> None:
        """Hand every `signal` frame this peer's connection receives to its thread."""
        while True:
            frame = await self.client.next_event("signal", timeout=PEER_TIMEOUT * 2)
            assert frame["session"] == self.session and frame["from"] == self.other, frame
            self.inbox.put(frame)

    # --- the asyncio side (runs in the peer's thread)

    async def send_signal(self, kind: str, payload: Any) -> None:
        request = functools.partial(
            self.client.request, "signal", session=self.session, to=self.other, kind=kind, payload=payload,
        )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: trio.from_thread.run(request, trio_token=self.trio_token))

    async def next_signal(self, kind: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        frame = await loop.run_in_executor(None, functools.partial(self.inbox.get, timeout=PEER_TIMEOUT))
        assert frame["kind"] == kind, frame
        return frame

    def run(self, offerer: bool) -> None:
        asyncio.run(asyncio.wait_for(self.dialog(offerer), PEER_TIMEOUT))

    async def dialog(self, offerer: bool) -> None:
        pc = RTCPeerConnection()
        got = asyncio.Queue()
        opened = asyncio.Event()
        channel_box: list[Any] = []

        def wire(channel: Any) -> None:
            channel_box.append(channel)
            channel.on("message", got.put_nowait)
            if channel.readyState == "open":
                opened.set()
            channel.on("open", opened.set)

        try:
            if offerer:
                wire(pc.createDataChannel("chat"))
                await pc.setLocalDescription(await pc.createOffer())
                await self.send_signal("offer", {"type": "offer", "sdp": pc.localDescription.sdp})
                answer = (await self.next_signal("answer"))["payload"]
                await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            else:
                pc.on("datachannel", wire)
                offer = (await self.next_signal("offer"))["payload"]
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type=offer["type"]))
                await pc.setLocalDescription(await pc.createAnswer())
                await self.send_signal("answer", {"type": "answer", "sdp": pc.localDescription.sdp})
            await opened.wait()
            channel = channel_box[0]
            # both ways, interleaved: each side sends its message, then reads the other's
            for n in range(ROUNDS):
                channel.send(f"{self.name} #{n}")
                self.received.append(await got.get())
            self.state = pc.connectionState
            if offerer:
                await self.send_signal("hangup", {"reason": "done"})
            else:
                await self.next_signal("hangup")
        finally:
            await pc.close()


async def test_two_aiortc_peers_connect_through_signaling_only(server):
    session = await server.create_session("alice", "bob")
    sid = session["id"]
    token = trio.lowlevel.current_trio_token()
    with trio.fail_after(PEER_TIMEOUT + 15):
        async with server.client("alice") as alice_ws, server.client("bob") as bob_ws:
            await alice_ws.request("join", session=sid)
            await bob_ws.request("join", session=sid)
            alice = Peer("alice", "bob", sid, alice_ws, token)
            bob = Peer("bob", "alice", sid, bob_ws, token)
            async with trio.open_nursery() as pumps:
                pumps.start_soon(alice.pump)
                pumps.start_soon(bob.pump)
                async with trio.open_nursery() as peers:
                    peers.start_soon(functools.partial(trio.to_thread.run_sync, bob.run, False))
                    peers.start_soon(functools.partial(trio.to_thread.run_sync, alice.run, True))
                pumps.cancel_scope.cancel()

    assert alice.state == bob.state == "connected"
    assert alice.received == [f"bob #{n}" for n in range(ROUNDS)]
    assert bob.received == [f"alice #{n}" for n in range(ROUNDS)]


async def test_a_stranger_cannot_signal_the_participants(server):
    session = await server.create_session("alice", "bob")
    sid = session["id"]
    other = await server.create_session("mallory", "trent")  # mallory is a participant elsewhere

    # mallory's own aiortc peer makes a real offer to push at alice and bob
    async def make_offer() -> dict[str, str]:
        pc = RTCPeerConnection()
        pc.createDataChannel("sneaky")
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"type": "offer", "sdp": pc.localDescription.sdp}
        await pc.close()
        return offer

    offer = await trio.to_thread.run_sync(lambda: asyncio.run(asyncio.wait_for(make_offer(), PEER_TIMEOUT)))

    with trio.fail_after(20):
        async with server.client("alice") as alice, server.client("bob") as bob, server.client("mallory") as mallory:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)

            with pytest.raises(RequestError) as err:
                await mallory.request("join", session=sid)
            assert err.value.code == "forbidden"
            for target in ("alice", "bob"):
                with pytest.raises(RequestError) as err:
                    await mallory.request("signal", session=sid, to=target, kind="offer", payload=offer)
                assert err.value.code == "not_joined"

            # joined to a session of her own, she still cannot reach users who are not in it
            await mallory.request("join", session=other["id"])
            for target in ("alice", "bob"):
                with pytest.raises(RequestError) as err:
                    await mallory.request("signal", session=other["id"], to=target, kind="offer", payload=offer)
                assert err.value.code == "not_joined"

            # alice and bob still talk, and never saw a frame from mallory
            await alice.request("signal", session=sid, to="bob", kind="hangup", payload=None)
            frame = await bob.next_event("signal")
            assert frame["from"] == "alice"
            await trio.sleep(0.05)
            for client in (alice, bob):
                assert not [e for e in client.pending_events() if e.get("from") == "mallory"]
                assert not [e for e in client.pending_events("signal")]
