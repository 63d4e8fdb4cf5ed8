"""Storage keeps answering while the Trio loop is saturated, on both databases.

The storage threads must take the GIL back after every statement; beside a busy loop that
releases and retakes it many times a millisecond they lost that race for about a second
each time (`storage/gil_turns.py`), so a chat ack or a billing checkpoint waited seconds
whenever the server was busy. Here one task keeps the loop busy the way a relay flood does
(always runnable, a checkpoint every ~0.1 ms), and a sender stores and reads chat. While it
is saturated, the actor asks for chat runs in few statements (`few_statements`)."""

from __future__ import annotations

import time

import trio

from storage import messages as sm
from tests.storage.conftest import Store
from tests.storage.test_group_commit import Counting
from tests.storage.test_storage import chat, new_session, open_storage

WRITES = 20
BUDGET = 10.0  # seconds for all of them: each took about a second without turns


async def saturate(stop: trio.Event) -> None:
    """A task that is always runnable: ~0.1 ms of Python between checkpoints."""
    while not stop.is_set():
        end = time.perf_counter() + 0.0001
        while time.perf_counter() < end:
            pass
        await trio.sleep(0)


async def test_chat_is_stored_and_read_back_while_the_loop_is_saturated(store: Store):
    backend = Counting(store.backend())
    async with open_storage(backend) as (actor, storage):
        await storage.write(new_session("s"))
        stop = trio.Event()
        stored: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(saturate, stop)
            with trio.move_on_after(BUDGET):
                for n in range(WRITES):
                    [answer] = await storage.write_many([chat("s", f"c{n}")])  # a run, as chat.send stores it
                    message, _ = answer.unwrap()
                    stored.append(message.seq)
                    history = await storage.read(sm.GetMessages(session_id="s", limit=100))
                    assert [m.seq for m in history] == stored
            stop.set()
    assert stored == list(range(1, WRITES + 1)), f"only {len(stored)} of {WRITES} writes in {BUDGET} s"
    assert actor.gil_turns.turns > 0  # the loop was busy and gave the threads their turns
    assert any(backend.few_statements)  # and runs were sent in few statements while it was
