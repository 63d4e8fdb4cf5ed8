"""Our first customers' scale: 50 users in 25 sessions signaling and chatting at once.
Correctness only: every frame reaches the right peer, none a wrong one. No timing asserts."""

from __future__ import annotations

import random

import trio

PAIRS = 25
SIGNALS = 12
CHATS = 4
KINDS = ("offer", "answer", "candidate", "hangup")


async def test_fifty_users_in_twenty_five_sessions(server):
    sessions = [
        (await server.create_session(payer=f"payer{i}", provider=f"provider{i}"))["id"] for i in range(PAIRS)
    ]
    received: dict[str, dict[str, list[dict]]] = {}
    acks: dict[str, list[int]] = {}
    all_joined = trio.Event()
    joined_count = 0
    rng = random.Random(2024)
    delays = {f"{role}{i}": [rng.random() * 0.002 for _ in range(SIGNALS + CHATS)] for i in range(PAIRS) for role in ("payer", "provider")}

    async def user(index: int, me: str, peer: str) -> None:
        nonlocal joined_count
        session = sessions[index]
        async with server.client(me) as client:
            await client.request("join", session=session, timeout=30)
            joined_count += 1
            if joined_count == 2 * PAIRS:
                all_joined.set()
            await all_joined.wait()
            for n in range(SIGNALS):
                await client.request(
                    "signal", session=session, to=peer, kind=KINDS[n % 4], payload={"from": me, "n": n}, timeout=30,
                )
                await trio.sleep(delays[me][n])
            for n in range(CHATS):
                reply = await client.request("chat.send", session=session, client_id=f"{me}-{n}", body=f"{me} says {n}", timeout=30)
                acks.setdefault(me, []).append(reply["seq"])
                await trio.sleep(delays[me][SIGNALS + n])
            # wait for everything the peer sends, then a little longer for strays
            with trio.fail_after(60):
                while len(client.pending_events("signal")) < SIGNALS or len(client.pending_events("chat.message")) < CHATS:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            received[me] = {kind: client.pending_events(kind) for kind in ("signal", "chat.message")}
            await client.request("leave", session=session, timeout=30)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(PAIRS):
                nursery.start_soon(user, i, f"payer{i}", f"provider{i}")
                nursery.start_soon(user, i, f"provider{i}", f"payer{i}")

    assert len(received) == 2 * PAIRS
    for i in range(PAIRS):
        for me, peer in ((f"payer{i}", f"provider{i}"), (f"provider{i}", f"payer{i}")):
            signals = received[me]["signal"]
            assert [(s["session"], s["from"]) for s in signals] == [(sessions[i], peer)] * SIGNALS, me
            assert [s["payload"] for s in signals] == [{"from": peer, "n": n} for n in range(SIGNALS)], me
            assert [s["kind"] for s in signals] == [KINDS[n % 4] for n in range(SIGNALS)], me
            chats = received[me]["chat.message"]
            assert [(c["session"], c["sender"]) for c in chats] == [(sessions[i], peer)] * CHATS, me
            assert [c["body"] for c in chats] == [f"{peer} says {n}" for n in range(CHATS)], me
        # one conversation per session: seq 1..2*CHATS, no gap, no duplicate
        assert sorted(acks[f"payer{i}"] + acks[f"provider{i}"]) == list(range(1, 2 * CHATS + 1))
